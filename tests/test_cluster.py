"""Tests of dogbreed.cluster.submit and the cluster configs: a real Ray head on 127.0.0.1 runs a scan submitted through the
Jobs API, and a multi-node cluster on one machine spreads a scan's decode tasks and inference actors over its nodes.

Every Ray process these tests start is theirs alone: the head runs in its own session (and temp dir) and is
stopped by signalling that session, never with `ray stop`, which would also kill other Ray instances on the host.
"""

from __future__ import annotations

import io
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from dogbreed.cluster import jobs_api, submit
from dogbreed.config import ScanConfig, load_config
from dogbreed.errors import Exit
from dogbreed.scan.job import run_scan
from dogbreed.table import readers

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "dogbreed" / "samples"
SCAN_YAML = ROOT / "configs" / "scan.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows(out: Path) -> pd.DataFrame:
    return readers.read_all(out).set_index("path").sort_index()


def _assert_same_answers(got: pd.DataFrame, want: pd.DataFrame) -> None:
    assert list(got.index) == list(want.index)
    pd.testing.assert_series_equal(got["status"], want["status"])
    pd.testing.assert_series_equal(got["breed"], want["breed"])
    pd.testing.assert_series_equal(got["dog_score"], want["dog_score"], atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """33 photos: three copies of the samples, enough for several decode blocks on each node."""
    root = tmp_path_factory.mktemp("photos")
    for copy in "abc":
        shutil.copytree(SAMPLES, root / copy)
    return root


@pytest.fixture(scope="module")
def local_rows(photos, tmp_path_factory, scan_config) -> pd.DataFrame:
    """The single-node answer: a scan on a local Ray started by run_scan itself."""
    out = tmp_path_factory.mktemp("local-out")
    run_scan(scan_config([photos], out, **{"decode.batch_size": 4, "inference.batch_size": 8}))
    return _rows(out)


# --- configs -----------------------------------------------------------------------------------------------


def test_ray_up_cluster_yaml_is_valid_and_has_a_cpu_head_and_gpu_workers():
    from ray.autoscaler._private.util import prepare_config, validate_config  # what `ray up` itself runs

    cfg = yaml.safe_load((ROOT / "configs" / "cluster.yaml").read_text())
    validate_config(prepare_config(cfg))
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0}
    assert types["gpu_workers"]["node_config"]["InstanceType"].startswith(("g5.", "g6."))
    assert any("pip install" in c and "dogbreed" in c for c in cfg["setup_commands"])
    # The output is object storage written by the head alone: no shared output folder is mounted anywhere.
    assert "--out s3://" in (ROOT / "configs" / "cluster.yaml").read_text()
    assert not any("dogbreed" in option for option in cfg["docker"]["run_options"])


def test_rayjob_manifest_runs_the_scan_job_with_its_config_on_gpu_workers():
    job = yaml.safe_load((ROOT / "configs" / "rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:4] == ["python", "jobs/scan.py", "--config", "configs/scan.yaml"]
    assert (ROOT / argv[1]).is_file() and (ROOT / argv[3]).is_file()
    load_config(ScanConfig, ROOT / argv[3])  # the config it names is valid
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["working_dir"]
    out = argv[argv.index("--out") + 1]
    assert out.startswith(("s3://", "gs://")) and "--log-file" not in argv  # nothing written to a pod's volume
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert head["serviceAccountName"]  # the driver's credentials for the bucket (IRSA / Workload Identity)
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert any(c["resources"]["limits"].get("nvidia.com/gpu") for w in workers for c in w["template"]["spec"]["containers"])


# --- submit without a cluster --------------------------------------------------------------------------------


def test_entrypoint_ships_the_config_relative_to_the_project_and_passes_args_through():
    cmd = submit.entrypoint("scan", ROOT / "configs" / "scan.yaml", ["/photos dir", "--out", "/out"], ROOT)
    assert shlex.split(cmd) == ["python", "jobs/scan.py", "--config", "configs/scan.yaml", "/photos dir", "--out", "/out"]
    with pytest.raises(submit.SubmitError, match="outside the project folder"):
        submit.entrypoint("scan", Path("/etc/scan.yaml"), [], ROOT)


def test_runtime_env_ships_the_project_but_not_environments_outputs_or_tests():
    with submit.staged_project(ROOT) as staged:
        env = submit.runtime_env(staged)
        assert Path(env["working_dir"]) == staged and (staged / "jobs" / "scan.py").is_file()
        assert not any((staged / name).exists() for name in (".venv", ".git", "out", "tests"))


def test_unreachable_address_is_one_clear_sentence():
    with pytest.raises(submit.SubmitError, match=r"cannot reach the Ray dashboard at http://127\.0\.0\.1:\d+"):
        submit.connect(f"http://127.0.0.1:{_free_port()}", timeout_s=2)


def test_missing_address_says_how_to_give_one(monkeypatch):
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(submit.SubmitError, match="--address"):
        jobs_api.resolve_address(None)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:8265")
    assert jobs_api.resolve_address(None) == "http://10.0.0.5:8265"
    assert jobs_api.resolve_address("http://head:8265") == "http://head:8265"


def test_bad_config_is_refused_before_anything_is_shipped(tmp_path):
    bad = tmp_path / "scan.yaml"
    bad.write_text("inference: {concurency: 2}\n")
    with pytest.raises(submit.SubmitError, match="inference.concurency"):
        submit.submit("scan", [], address="http://127.0.0.1:1", config=bad)


# --- several nodes on one machine (runs before the head below starts, leaving it the CPUs) ----------------------


@pytest.mark.slow  # a multi-node cluster
def test_scan_spreads_over_nodes_and_gives_the_single_node_answers(photos, local_rows, tmp_path, scan_config):
    """A head with no CPUs and two 2-CPU workers: decode tasks and the two inference actors must use both."""
    import ray
    import ray.data
    from ray.cluster_utils import Cluster

    # Both actors must be up before the first batch, and hold one batch at a time, or the first may take every batch.
    ctx = ray.data.DataContext.get_current()
    wait_before = ctx.wait_for_min_actors_s
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "gcs_server_port": _free_port(), "include_dashboard": False,
        "dashboard_agent_listen_port": _free_port()})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        workers = {n.node_id for n in cluster.worker_nodes}
        # 1.5 + 0.5 CPUs: each 2-CPU node holds one actor and one decode task, so Ray cannot pack both actors
        # onto one node (with the default 0.5 it may, and then one node infers everything).
        cfg = scan_config([photos], tmp_path / "out", address=cluster.address,
                          **{"inference.concurrency": 2, "decode.batch_size": 2, "inference.batch_size": 4,
                              "inference.num_cpus": 1.5, "decode.num_cpus": 0.5,
                              "inference.wait_for_actors_s": 120, "inference.max_tasks_in_flight": 1})
        summary = run_scan(cfg)
    finally:
        ctx.wait_for_min_actors_s = wait_before
        ray.shutdown()
        cluster.shutdown()
    assert summary.counts.get("error", 0) == 0
    got = _rows(tmp_path / "out")
    spread = {col: got[col].value_counts().to_dict() for col in ("decode_node", "infer_node")}
    assert set(got["decode_node"]) <= workers and len(set(got["decode_node"])) >= 2, spread
    assert set(got["infer_node"]) <= workers and len(set(got["infer_node"])) >= 2, spread
    _assert_same_answers(got, local_rows)


# --- a real head on 127.0.0.1 ----------------------------------------------------------------------------------


def _session_pids(sid: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True, timeout=10).stdout
    return [int(p) for p, s in (line.split() for line in out.splitlines()) if int(s) == sid]


def _signal_session(sid: int, sig: int) -> None:
    for pid in _session_pids(sid):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """`ray start --head --block` on loopback ports, in its own session, with token authentication on.

    The token is random and given to the head in its environment only, so ~/.ray/auth_token is neither
    needed nor touched; the client passes it explicitly, as `dogbreed submit` does from RAY_AUTH_TOKEN.
    """
    temp = Path("/tmp") / f"dbh-{secrets.token_hex(3)}"  # short: Ray's socket paths must fit in 107 bytes
    token = secrets.token_hex(32)
    dash = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
            # `python` in a job's entrypoint must be this interpreter (Ray and the project's dependencies).
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"}
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--disable-usage-stats",
           "--node-ip-address=127.0.0.1", f"--port={_free_port()}", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dash}", "--include-dashboard=true", "--num-cpus=2", f"--temp-dir={temp}",
           f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}"]
    log = open(tmp_path_factory.mktemp("head") / "head.log", "w")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if head.poll() is not None:
                pytest.fail(f"ray start exited with {head.returncode}; see {log.name}")
            try:
                submit.connect(url, token, timeout_s=2).list_jobs()
                break
            except (submit.SubmitError, RuntimeError):
                if time.monotonic() > deadline:
                    pytest.fail(f"the head's Jobs API did not come up within 90 s; see {log.name}")
                time.sleep(1)
        yield url, token
    finally:
        # Like `ray stop`, but only for this session: SIGTERM, a grace period, then SIGKILL for what is left.
        _signal_session(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        _signal_session(head.pid, signal.SIGKILL)
        head.wait(timeout=10)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow  # a real Ray head
def test_submitted_scan_runs_on_the_head_and_matches_a_local_scan(ray_head, local_rows, tmp_path):
    url, token = ray_head
    out = tmp_path / "out"
    logs = io.StringIO()
    result = submit.submit("scan", [str(SAMPLES), "--out", str(out)], address=url, token=token, out=logs)
    assert (result.status, result.exit_code) == ("SUCCEEDED", 0), logs.getvalue()[-3000:]
    assert "11 files, 11 processed" in logs.getvalue()  # the job's own summary line, followed live

    got = _rows(out)
    assert len(got) == 11
    assert got["status"].value_counts().to_dict() == local_rows.loc[local_rows.index.str.contains("/a/"), "status"].value_counts().to_dict()
    want = local_rows[local_rows.index.str.contains("/a/")].copy()
    want.index = pd.Index([str(SAMPLES / Path(p).name) for p in want.index], name="path")
    _assert_same_answers(got, want.sort_index())

    jobs = submit.list_jobs(url, token)
    assert jobs[0]["job_id"] == result.job_id and jobs[0]["status"] == "SUCCEEDED"
    assert "11 files, 11 processed" in submit.job_logs(result.job_id, url, token)
    assert submit.stop_job(result.job_id, url, token) is False  # already over


@pytest.mark.slow  # a real Ray head
def test_a_failing_job_exits_with_the_jobs_own_exit_code(ray_head, tmp_path):
    url, token = ray_head
    logs = io.StringIO()
    result = submit.submit("scan", [str(tmp_path / "no-such-folder"), "--out", str(tmp_path / "out")],
                           address=url, token=token, out=logs)
    assert result.status == "FAILED"
    assert result.exit_code == Exit.REFUSED, logs.getvalue()[-2000:]  # as a local `dogbreed scan` exits
    assert "refused:" in logs.getvalue()


@pytest.mark.slow  # a real Ray head
def test_stopped_job_exits_non_zero(ray_head, tmp_path):
    url, token = ray_head
    result = submit.submit("scan", [str(SAMPLES), "--out", str(tmp_path / "out")], address=url, token=token,
                           follow=False, out=io.StringIO())
    assert submit.stop_job(result.job_id, url, token) is True
    client = submit.connect(url, token)
    deadline = time.monotonic() + 60
    while submit.outcome(client, result.job_id).status not in ("STOPPED", "FAILED", "SUCCEEDED"):
        assert time.monotonic() < deadline, "the stopped job did not end within 60 s"
        time.sleep(1)
    final = submit.outcome(client, result.job_id)
    assert (final.status, final.exit_code) == ("STOPPED", Exit.STOPPED)
    assert readers.manifests(tmp_path / "out") == []  # no run was committed


@pytest.mark.slow  # a real Ray head
def test_wrong_token_and_missing_gpus_are_refused_in_one_sentence(ray_head, monkeypatch):
    url, _ = ray_head
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    with pytest.raises(submit.SubmitError, match="requires a token"):
        submit.connect(url, token="0" * 64)
    _, token = ray_head
    with pytest.raises(submit.SubmitError, match="asks for 1 GPUs but the cluster has 0"):
        submit.submit("train", ["/d", "--out", "/o", "--gpu"],
                      address=url, token=token, out=io.StringIO())


@pytest.mark.slow  # a real Ray head
def test_unknown_job_id_is_one_clear_sentence(ray_head):
    url, token = ray_head
    with pytest.raises(submit.SubmitError, match="no job 'raysubmit_nope'"):
        submit.job_logs("raysubmit_nope", url, token)
