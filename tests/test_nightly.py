"""Nightly operation, proved on real processes: incremental re-runs, atomic commits under SIGKILL, killed Ray
workers, one run at a time, the archive guard, and what analysts and cron see.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dogbreed import results
from dogbreed.config import dump_config
from dogbreed.models import describe_model
from dogbreed.scan import EXIT_BAD_PHOTOS, EXIT_LOCKED, EXIT_OK, EXIT_REFUSED, run_scan
from dogbreed.store import OutputStore, new_run_id, utcnow

DOGBREED = Path(sys.executable).with_name("dogbreed")  # the installed console script, as cron runs it
DEFAULT_MODEL_ID = describe_model("default")[1]
BUSY_ACTOR = "ray::MapWorker(MapBatches(_InferStage)).submit"  # the inference actor, running a batch
BUSY_DECODER = "ray::MapBatches(_decode_stage)"  # a decode task worker, running a batch


# ---------------------------------------------------------------- helpers: processes, output, commits

def cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run `dogbreed ARGS` to completion in a child process."""
    return subprocess.run([str(DOGBREED), *args], capture_output=True, text=True, timeout=timeout)


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = Path(f"/proc/{name}/stat").read_text()
            except OSError:
                continue
            kids.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(name))
    return kids


def descendants(pid: int) -> list[int]:
    """Every live process below pid (children, grandchildren, ...)."""
    kids, found, stack = _children(), [], [pid]
    while stack:
        for child in kids.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def find_worker(root_pid: int, prefix: str) -> int | None:
    """A Ray worker below root_pid whose process title starts with prefix (Ray titles a busy actor
    ``ray::Class.method`` and a task worker ``ray::function``)."""
    return next((pid for pid in descendants(root_pid) if title(pid).startswith(prefix)), None)


def snapshot(out: Path) -> dict[str, str]:
    """Committed output, byte for byte: relative path -> sha256 of every file under OUT/runs."""
    runs = out / results.RUNS_DIR
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(runs.rglob("*")) if p.is_file()}


def commit_rows(out: Path, paths: list[Path], status: str = "neither", model_id: str = DEFAULT_MODEL_ID) -> str:
    """Commit one run with a row per path (real size and mtime) through results.to_table + OutputStore.commit."""
    n, run_id = len(paths), new_run_id()
    stats = [p.stat() if status != "deleted" else None for p in paths]
    table = results.to_table({
        "path": [str(p) for p in paths], "status": [status] * n, "run_id": [run_id] * n,
        "size_bytes": [s.st_size if s else None for s in stats], "model_id": [model_id] * n,
        "mtime": pa.array([s.st_mtime_ns // 1000 if s else None for s in stats], pa.int64()).cast(results.UTC_US),
        "processed_at": pa.array([utcnow()] * n, results.UTC_US),
    })
    store = OutputStore(out)
    pq.write_table(table, store.stage(run_id) / "part-0.parquet")
    store.commit(run_id, {"run_id": run_id, "model_id": model_id, "status": "committed"})
    return run_id


def assert_one_current_row_per_file(out: Path, files: list[Path]) -> pd.DataFrame:
    latest = results.latest(out)
    assert latest["path"].is_unique, latest["path"][latest["path"].duplicated()].tolist()
    assert sorted(latest["path"]) == sorted(str(f) for f in files)
    return latest


# ---------------------------------------------------------------- 1. incremental by default

def test_rerun_processes_only_new_and_changed_files_and_records_deleted(ray_local, tmp_path, make_photos,
                                                                         write_photo, scan_config):
    root, out = tmp_path / "photos", tmp_path / "out"
    photos = make_photos(root, 6)
    cfg = scan_config([root], out)
    first = run_scan(cfg)
    assert (first.processed, first.unchanged) == (6, 0)
    again = run_scan(cfg)
    assert (again.processed, again.unchanged) == (0, 6)
    assert not list((out / "runs" / again.run_id).glob("*.parquet"))  # nothing opened, no row rewritten

    write_photo(photos[1], seed=100, size=(200, 150))  # changed content and size
    st = photos[3].stat()
    os.utime(photos[3], ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # same bytes, newer mtime
    new = write_photo(root / "new.jpg", seed=101)
    photos[2].unlink()
    before = snapshot(out)
    dry = run_scan(cfg, dry_run=True)
    assert sorted(dry.would_process) == sorted(str(p) for p in (photos[1], photos[3], new))
    assert dry.would_delete == [str(photos[2])] and dry.counts["deleted"] == 1
    assert snapshot(out) == before  # a dry run writes nothing

    third = run_scan(cfg)
    assert (third.processed, third.unchanged, third.counts["deleted"]) == (3, 3, 1)
    current = assert_one_current_row_per_file(out, [photos[0], photos[1], photos[3], photos[4], photos[5], new])
    run_of = dict(zip(current["path"], current["run_id"]))
    assert run_of[str(photos[0])] == first.run_id and run_of[str(photos[1])] == third.run_id
    assert len(results.read_all(out)) == 6 + 3 + 1  # history: run 1, run 3 and one deleted row

    # The analyst's view from the command line, across the three runs.
    proc = subprocess.run([str(DOGBREED), "latest", str(out), "--csv", str(tmp_path / "latest.csv")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    table = pd.read_csv(tmp_path / "latest.csv")
    assert sorted(table["path"]) == sorted(current["path"]) and "6 photos" in proc.stderr


@pytest.mark.slow
def test_mode_all_and_a_different_model_reprocess_everything(ray_local, tmp_path, make_photos, scan_config):
    from dogbreed.models import default_spec, load_default, save_artifact

    root, out = tmp_path / "photos", tmp_path / "out"
    make_photos(root, 4)
    assert run_scan(scan_config([root], out)).processed == 4
    assert run_scan(scan_config([root], out, mode="all")).processed == 4

    # Same weights, different breed list: a different model_id, so every photo is due again.
    other_id = save_artifact(load_default().net, default_spec(count_dingo=False), tmp_path / "model")
    assert other_id != DEFAULT_MODEL_ID
    other = scan_config([root], out, model=str(tmp_path / "model"))
    assert run_scan(other).processed == 4
    assert set(results.latest(out)["model_id"]) == {other_id}
    assert run_scan(other).processed == 0
    assert run_scan(scan_config([root], out), dry_run=True).processed == 4  # back to the default: due again


def test_dry_run_prints_counts_and_the_first_paths(tmp_path, make_photos):
    root, out = tmp_path / "photos", tmp_path / "out"
    photos = make_photos(root, 12)
    proc = cli("scan", str(root), "--out", str(out), "--dry-run")
    assert proc.returncode == EXIT_OK, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "would process (12, first 10):"
    assert lines[1:11] == [f"  {p}" for p in photos[:10]]
    assert lines[-1].startswith("dry run: 12 files; would process 12 ") and "record 0 as deleted" in lines[-1]
    assert not (out / "runs").exists()


# ---------------------------------------------------------------- 2 + 4. SIGKILLed driver, concurrent run, stale lock

@pytest.fixture(scope="module")
def killed_run(ray_local, tmp_path_factory, scan_config):
    """Commit 10 photos, start a scan of 30 more, run a second scan beside it, SIGKILL the first mid-run, re-run.

    Records what each step saw; the tests below check one property each.
    """
    tmp = tmp_path_factory.mktemp("killed")
    root, out, log_file = tmp / "photos", tmp / "out", tmp / "cron.log"
    first = [_photo(root / f"a{i:02d}.jpg", i) for i in range(10)]
    committed = run_scan(scan_config([root], out))
    rest = [_photo(root / f"b{i:02d}.jpg", 100 + i) for i in range(30)]
    config = tmp / "scan.yaml"
    config.write_text(dump_config(scan_config([root], out)))
    seen: dict = {"committed_run": committed.run_id, "before": snapshot(out), "files": first + rest}

    # Output to a file, not a pipe: Ray agents orphaned by the kill would hold a pipe open for a minute.
    with open(tmp / "victim.log", "w") as victim_log:
        victim = subprocess.Popen([str(DOGBREED), "scan", str(root), "--out", str(out), "-c", str(config)],
                                  stdout=victim_log, stderr=subprocess.STDOUT)
    family: list[tuple[int, str]] = []
    try:
        _wait_for(lambda: any((out / "_staging").glob("*")), victim, "the scan to stage its run", tmp / "victim.log")
        seen["lock_holder"] = (out / ".lock").read_text()
        seen["second"] = cli("scan", str(root), "--out", str(out), "-c", str(config), timeout=120)
        seen["victim_alive_after_second"] = victim.poll() is None  # refused while the lock was held: never waited
        worker = _wait_for(lambda: find_worker(victim.pid, BUSY_ACTOR), victim, "the inference actor to start a batch",
                           tmp / "victim.log")
        time.sleep(0.3)
        seen["killed_worker_title"] = title(worker)
        family = [(pid, _started(pid)) for pid in descendants(victim.pid)]
        victim.send_signal(signal.SIGKILL)
        seen["victim_rc"] = victim.wait(timeout=60)
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait(timeout=60)
    seen["victim_log"] = (tmp / "victim.log").read_text()
    seen["after_kill"] = snapshot(out)
    seen["staging_after_kill"] = sorted(p.name for p in (out / "_staging").iterdir())
    seen["rerun"] = cli("scan", str(root), "--out", str(out), "-c", str(config), "--log-file", str(log_file))
    seen["staging_after_rerun"] = sorted(p.name for p in (out / "_staging").iterdir())
    seen["log"] = log_file.read_text() if log_file.exists() else ""
    seen["out"] = out
    yield seen
    for pid, started in family:  # Ray agents orphaned by the kill exit on their own within a minute
        if started and _started(pid) == started:  # the same process, not a recycled pid
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _started(pid: int) -> str | None:
    """The process's start time (clock ticks since boot), to tell it from a later process with the same pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _photo(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((rng.random((12, 16, 3)) * 255).astype(np.uint8)).resize((480, 360)).save(path)
    return path


def _wait_for(probe, proc: subprocess.Popen, what: str, log: Path, timeout: float = 180):
    """Poll probe() until it is truthy; fail (with the tail of proc's log) if proc exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        if proc.poll() is not None:
            pytest.fail(f"the scan exited ({proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")


@pytest.mark.slow  # a SIGKILL scenario
def test_second_concurrent_scan_exits_at_once_with_code_5(killed_run):
    second = killed_run["second"]
    assert second.returncode == EXIT_LOCKED, second.stderr
    assert "refused: another scan is already running on" in second.stderr
    assert killed_run["victim_alive_after_second"]  # it did not wait for the lock to be released


@pytest.mark.slow  # a SIGKILL scenario
def test_sigkilled_scan_leaves_committed_output_byte_identical(killed_run):
    assert killed_run["victim_rc"] == -signal.SIGKILL
    assert killed_run["killed_worker_title"].startswith(BUSY_ACTOR)  # the kill landed while batches were running
    assert "execution finished" not in killed_run["victim_log"]
    assert killed_run["after_kill"] == killed_run["before"]
    assert len(killed_run["staging_after_kill"]) == 1  # its half-written run stays out of sight in staging


@pytest.mark.slow  # a SIGKILL scenario
def test_rerun_after_sigkill_takes_over_the_lock_and_does_exactly_the_missing_work(killed_run):
    rerun, out = killed_run["rerun"], killed_run["out"]
    assert str(os.getpid()) not in killed_run["lock_holder"] and "pid " in killed_run["lock_holder"]
    assert rerun.returncode == EXIT_OK, rerun.stderr[-3000:]
    assert "40 files, 30 processed, 10 unchanged" in rerun.stdout
    assert "removed staging of 1 unfinished earlier run" in rerun.stderr
    assert killed_run["staging_after_rerun"] == []
    current = assert_one_current_row_per_file(out, killed_run["files"])
    assert set(current["status"]) <= set(results.OK_STATUSES)
    first_ten = current[current["path"].str.contains("/a")]
    assert set(first_ten["run_id"]) == {killed_run["committed_run"]}  # committed rows were not redone
    assert len(results.read_all(out)) == 40  # no duplicates anywhere in history


@pytest.mark.slow  # a SIGKILL scenario
def test_log_file_gets_the_one_line_summary(killed_run):
    summary = [line for line in killed_run["rerun"].stdout.splitlines() if line.startswith("run ")]
    assert len(summary) == 1 and summary[0] in killed_run["log"]


# ---------------------------------------------------------------- 3. worker faults

@pytest.mark.slow  # SIGKILLs Ray workers
def test_killed_ray_workers_lose_no_photo(ray_local, tmp_path, make_photos, scan_config, caplog):
    root, out = tmp_path / "photos", tmp_path / "out"
    photos = make_photos(root, 30)
    killed: list[str] = []
    done = threading.Event()

    def kill_when_busy(prefix: str) -> None:
        while not done.is_set():
            pid = find_worker(os.getpid(), prefix)
            if pid:
                time.sleep(0.2)
                name = title(pid)
                os.kill(pid, signal.SIGKILL)
                killed.append(name)
                return
            time.sleep(0.05)

    killers = [threading.Thread(target=kill_when_busy, args=(p,), daemon=True)
               for p in (BUSY_ACTOR, BUSY_DECODER)]
    for k in killers:
        k.start()
    with caplog.at_level(logging.WARNING, logger="dogbreed.scan"):
        summary = run_scan(scan_config([root], out))
    done.set()
    assert len(killed) == 2, f"only killed {killed}: the run ended before both kills landed"
    assert summary.processed == 30 and summary.counts.get("error", 0) == 0
    assert_one_current_row_per_file(out, photos)
    assert len(results.read_all(out)) == 30
    assert "lost to worker failures" not in caplog.text  # Ray retried the batches (a bounded number of times)


def test_slow_photo_in_a_real_scan_becomes_an_error_row_and_its_batch_survives(ray_local, tmp_path, write_photo,
                                                                               scan_config):
    root, out = tmp_path / "photos", tmp_path / "out"
    small = [write_photo(root / f"s{i}.jpg", seed=i, size=(64, 48)) for i in range(4)]
    big = root / "s2_slow.jpg"  # its decoder takes a minute (the poison plugin's SLEEP)
    big.write_bytes(b"POISON:SLEEP\n" + bytes(64))
    plugin = str(Path(__file__).with_name("poison_plugin.py"))
    summary = run_scan(scan_config([root], out, **{"decode.timeout_s": 1.5, "decode.batch_size": 5,
                                                   "decode.plugins": [plugin]}))
    rows = assert_one_current_row_per_file(out, [*small, big]).set_index("path")
    assert rows.loc[str(big), "status"] == "error"
    assert rows.loc[str(big), "error"] == "decoder hung for over 1.5 s"
    assert set(rows.drop(str(big))["status"]) <= set(results.OK_STATUSES)
    assert summary.exit_code == EXIT_BAD_PHOTOS


# ---------------------------------------------------------------- 5. archive guard

def test_missing_root_is_refused_with_code_4_and_nothing_changes(tmp_path, make_photos):
    out = tmp_path / "out"
    commit_rows(out, make_photos(tmp_path / "photos", 3))
    before = snapshot(out)
    proc = cli("scan", str(tmp_path / "unmounted"), "--out", str(out), timeout=120)
    assert proc.returncode == EXIT_REFUSED, proc.stderr
    assert "does not exist (is the archive mounted?)" in proc.stderr
    assert snapshot(out) == before


@pytest.mark.slow  # two CLI processes
def test_emptied_root_is_refused_unless_allowed(tmp_path, make_photos):
    root, out = tmp_path / "photos", tmp_path / "out"
    photos = make_photos(root, 3)
    commit_rows(out, photos)
    for p in photos:
        p.unlink()
    before = snapshot(out)
    proc = cli("scan", str(root), "--out", str(out), timeout=120)
    assert proc.returncode == EXIT_REFUSED, proc.stderr
    assert "is empty but earlier runs saw 3 files" in proc.stderr and "--allow-empty-roots" in proc.stderr
    assert snapshot(out) == before

    proc = cli("scan", str(root), "--out", str(out), "--allow-empty-roots", timeout=120)
    assert proc.returncode == EXIT_OK, proc.stderr
    assert "deleted 3" in proc.stdout and results.latest(out).empty


def test_unreadable_root_is_refused(tmp_path):
    """Root can read any folder, so the check runs in a child that drops to uid 65534 (nobody)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to drop privileges to uid 65534")
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="dogbreed_noroot_"))
    try:
        folder.chmod(0o700)  # owned by root: nobody may not list it
        code = ("import os, sys; from dogbreed.listing import RootError, list_roots\n"
                "os.setgid(65534); os.setuid(65534)\n"
                "try:\n    list_roots([sys.argv[1]], False)\nexcept RootError as e:\n    print('refused:', e)\n")
        proc = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True,
                              timeout=120, cwd="/")
    finally:
        shutil.rmtree(folder)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == f"refused: root {folder} is not readable"


# ---------------------------------------------------------------- 7. for analysts

def test_latest_keeps_the_newest_row_per_photo_over_many_runs(tmp_path):
    """60 synthetic runs re-processing random subsets; the last deletes some photos."""
    rng = np.random.default_rng(0)
    root, out = tmp_path / "photos", tmp_path / "out"
    paths = [root / f"{i:05d}.jpg" for i in range(3000)]
    for p in paths:
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"x")
    newest: dict[str, str] = {}
    for _ in range(60):
        subset = [paths[i] for i in rng.choice(len(paths), 500, replace=False)]
        run_id = commit_rows(out, subset)
        newest.update({str(p): run_id for p in subset})
    gone = [p for p in paths[:100] if str(p) in newest]
    commit_rows(out, gone, status="deleted")
    current = results.latest(out)
    expected = {p: r for p, r in newest.items() if p not in {str(g) for g in gone}}
    assert dict(zip(current["path"], current["run_id"])) == expected
