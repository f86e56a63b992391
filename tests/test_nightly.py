"""Nightly operation, proved on real processes: incremental re-runs, atomic commits under SIGKILL, killed Ray
workers, one run at a time, the archive guard, and what analysts and cron see; on a local output and on an
s3:// output served by a real moto_server on 127.0.0.1.
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
import pyarrow.fs as pafs
import pytest
from deltalake import DeltaTable
from PIL import Image

from dogbreed.config import dump_config
from dogbreed.errors import Exit
from dogbreed.scan.job import run_scan
from dogbreed.table import readers, schema
from dogbreed.table.location import locate
from dogbreed.table.lock import holder
from dogbreed.table.store import LOG_DIR, open_table, run_prefixes
from dogbreed.vision.models import describe_model
from tests.processes import DOGBREED, cli

DEFAULT_MODEL_ID = describe_model("default")[1]
BUSY_ACTOR = "ray::MapWorker(MapBatches(_InferStage)).submit"  # the inference actor, running a batch
BUSY_DECODER = "ray::MapBatches(_decode_stage)"  # a decode task worker, running a batch


# ---------------------------------------------------------------- helpers: processes, output, commits


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


def snapshot(out: Path | str) -> dict[str, str]:
    """Committed output, byte for byte: every file of the table's log and every data file the table names."""
    loc = locate(out)
    table = open_table(loc)
    if table is None:
        return {}
    infos = loc.fs.get_file_info(pafs.FileSelector(loc.path(LOG_DIR), recursive=True))
    names = [i.path for i in infos if i.type == pafs.FileType.File]
    names += [loc.path(p) for p in table.get_add_actions(flatten=True).column("path").to_pylist()]
    digest = {}
    for name in sorted(names):
        with loc.fs.open_input_stream(name) as f:
            digest[name[len(loc.root) + 1:]] = hashlib.sha256(f.read()).hexdigest()
    return digest


def commit_rows(out: Path | str, paths: list[Path], status: str = "neither", model_id: str = DEFAULT_MODEL_ID) -> str:
    """Commit one run with a row per path (real size and mtime), as a scan commits it, under the default model."""
    from conftest import _commit_rows

    return _commit_rows(out, paths, status=status, model_id=model_id)


def assert_one_current_row_per_file(out: Path | str, files: list[Path]) -> pd.DataFrame:
    latest = readers.latest(out)
    assert latest["path"].is_unique, latest["path"][latest["path"].duplicated()].tolist()
    assert sorted(latest["path"]) == sorted(str(f) for f in files)
    return latest


# ---------------------------------------------------------------- 1. incremental by default

@pytest.mark.slow  # real processes, several seconds: the full suite (CI) runs it
def test_rerun_processes_only_new_and_changed_files_and_records_deleted(ray_local, tmp_path, make_photos,
                                                                         write_photo, scan_config):
    root, out = tmp_path / "photos", tmp_path / "out"
    photos = make_photos(root, 6)
    cfg = scan_config([root], out)
    first = run_scan(cfg)
    assert (first.processed, first.unchanged) == (6, 0)
    again = run_scan(cfg)
    assert (again.processed, again.unchanged) == (0, 6)
    assert readers.manifests(out)[-1]["run_id"] == again.run_id  # a commit of its own ...
    assert not (out / "data" / again.run_id).exists() and len(readers.read_all(out)) == 6  # ... adding no row

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
    assert len(readers.read_all(out)) == 6 + 3 + 1  # history: run 1, run 3 and one deleted row

    # The analyst's view from the command line, across the three runs.
    proc = subprocess.run([str(DOGBREED), "latest", str(out), "--csv", str(tmp_path / "latest.csv")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    table = pd.read_csv(tmp_path / "latest.csv")
    assert sorted(table["path"]) == sorted(current["path"]) and "6 photos" in proc.stderr


@pytest.mark.slow  # a scan, then a cron rerun in a real process
@pytest.mark.parametrize("model", ["default", "artifact"])
def test_an_unchanged_nightly_run_imports_neither_torch_nor_timm_nor_ray(model, ray_local, tmp_path, make_photos,
                                                                         scan_config):
    """A rerun with nothing new reads the table, lists and plans: it needs none of the network's libraries (importing
    torch and timm took the driver about 6 of a nightly run's 7 seconds), and starts no Ray. With a model folder
    (`--model out/models/dogapp`, the new-breeds case) too: its check against the backbone waits for work to do."""
    root, out = tmp_path / "photos", tmp_path / "out"
    make_photos(root, 3)
    overrides = {}
    if model == "artifact":
        from dogbreed.vision.models import default_spec, load_default, save_artifact

        save_artifact(load_default().net, default_spec(count_dingo=False), tmp_path / "model")
        overrides["model"] = str(tmp_path / "model")
    cfg = scan_config([root], out, **overrides)
    assert run_scan(cfg).processed == 3
    config = tmp_path / "scan.yaml"
    config.write_text(dump_config(cfg))
    code = ("import sys\nfrom dogbreed.cli import main\n"
            f"sys.argv = ['dogbreed', 'scan', {str(root)!r}, '--out', {str(out)!r}, '-c', {str(config)!r}]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
            "print('exit', code, *(m in sys.modules for m in ('torch', 'timm', 'ray')), file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "3 unchanged" in proc.stdout, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "exit 0 False False False", proc.stderr


@pytest.mark.slow  # two scans
@pytest.mark.parametrize("kind", ["local", "s3"])
def test_scan_commits_a_delta_table_an_unchanged_rerun_adds_no_rows_and_latest_has_one_row_per_photo(
        kind, ray_local, tmp_path, make_photos, scan_config, request):
    out = request.getfixturevalue("s3_out") if kind == "s3" else str(tmp_path / "out")
    photos = make_photos(tmp_path / "photos", 5)
    first = run_scan(scan_config([tmp_path / "photos"], out))
    uri = locate(out).uri
    assert first.processed == 5 and len(DeltaTable(uri).to_pandas()) == 5
    again = run_scan(scan_config([tmp_path / "photos"], out))
    assert (again.processed, again.unchanged) == (0, 5)
    table = DeltaTable(uri)
    assert table.version() == 1 and len(table.to_pandas()) == 5  # a commit, no new row
    assert [m["run_id"] for m in readers.manifests(out)] == [first.run_id, again.run_id]
    assert set(assert_one_current_row_per_file(out, photos)["run_id"]) == {first.run_id}
    proc = cli("latest", out)
    assert proc.returncode == 0 and "5 photos" in proc.stderr, proc.stderr


@pytest.mark.slow
def test_mode_all_and_a_different_model_reprocess_everything(ray_local, tmp_path, make_photos, scan_config):
    from dogbreed.vision.models import default_spec, load_default, save_artifact

    root, out = tmp_path / "photos", tmp_path / "out"
    make_photos(root, 4)
    assert run_scan(scan_config([root], out)).processed == 4
    assert run_scan(scan_config([root], out, mode="all")).processed == 4

    # Same weights, different breed list: a different model_id, so every photo is due again.
    other_id = save_artifact(load_default().net, default_spec(count_dingo=False), tmp_path / "model")
    assert other_id != DEFAULT_MODEL_ID
    other = scan_config([root], out, model=str(tmp_path / "model"))
    assert run_scan(other).processed == 4
    assert set(readers.latest(out)["model_id"]) == {other_id}
    assert run_scan(other).processed == 0
    assert run_scan(scan_config([root], out), dry_run=True).processed == 4  # back to the default: due again


@pytest.mark.slow  # real processes, several seconds: the full suite (CI) runs it
def test_dry_run_prints_counts_and_the_first_paths(tmp_path, make_photos):
    root, out = tmp_path / "photos", tmp_path / "out"
    photos = make_photos(root, 12)
    proc = cli("scan", str(root), "--out", str(out), "--dry-run")
    assert proc.returncode == Exit.OK, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "would process (12, first 10):"
    assert lines[1:11] == [f"  {p}" for p in photos[:10]]
    assert lines[-1].startswith("dry run: 12 files; would process 12 ") and "record 0 as deleted" in lines[-1]
    assert snapshot(out) == {} and not (out / "data").exists()


# ---------------------------------------------------------------- 2 + 4. SIGKILLed driver, concurrent run, stale lock

@pytest.fixture(scope="module", params=["local", "s3"])
def killed_run(request, ray_local, tmp_path_factory, scan_config):
    """Commit 10 photos, start a scan of 30 more, run a second scan beside it, SIGKILL the first mid-run, re-run.

    On a local folder and on s3:// (moto_server). Records what each step saw; the tests below check one
    property each.
    """
    with pytest.MonkeyPatch.context() as mp:
        yield from _killed_run(request.param, mp, request, tmp_path_factory, scan_config)


def _killed_run(kind: str, mp, request, tmp_path_factory, scan_config):
    tmp = tmp_path_factory.mktemp(f"killed-{kind}")
    root, log_file = tmp / "photos", tmp / "cron.log"
    out = request.getfixturevalue("s3_env")(mp) if kind == "s3" else str(tmp / "out")
    first = [_photo(root / f"a{i:02d}.jpg", i) for i in range(10)]
    committed = run_scan(scan_config([root], out))
    rest = [_photo(root / f"b{i:02d}.jpg", 100 + i) for i in range(30)]
    config = tmp / "scan.yaml"
    config.write_text(dump_config(scan_config([root], out)))
    seen: dict = {"committed_run": committed.run_id, "before": snapshot(out), "files": first + rest}

    # Output to a file, not a pipe: Ray agents orphaned by the kill would hold a pipe open for a minute.
    with open(tmp / "victim.log", "w") as victim_log:
        victim = subprocess.Popen([str(DOGBREED), "scan", str(root), "--out", out, "-c", str(config)],
                                  stdout=victim_log, stderr=subprocess.STDOUT)
    family: list[tuple[int, str]] = []
    try:
        seen["lock_holder"] = _wait_for(lambda: holder(locate(out)), victim, "the scan to take the lock",
                                        tmp / "victim.log")
        seen["second"] = cli("scan", str(root), "--out", out, "-c", str(config), timeout=120)
        seen["victim_alive_after_second"] = victim.poll() is None  # refused while the lock was held: never waited
        worker = _wait_for(lambda: find_worker(victim.pid, BUSY_ACTOR), victim, "the inference actor to start a batch",
                           tmp / "victim.log")
        # At once: with the network in OpenVINO a batch of these small photos takes tens of milliseconds.
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
    seen["prefixes_after_kill"] = run_prefixes(locate(out))
    seen["rerun"] = cli("scan", str(root), "--out", out, "-c", str(config), "--log-file", str(log_file))
    seen["prefixes_after_rerun"] = run_prefixes(locate(out))
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
    assert second.returncode == Exit.LOCKED, second.stderr
    assert "refused: another scan is already running on" in second.stderr
    assert killed_run["victim_alive_after_second"]  # it did not wait for the lock to be released


@pytest.mark.slow  # a SIGKILL scenario
def test_sigkilled_scan_leaves_committed_output_byte_identical(killed_run):
    assert killed_run["victim_rc"] == -signal.SIGKILL
    assert killed_run["killed_worker_title"].startswith(BUSY_ACTOR)  # the kill landed while batches were running
    assert "execution finished" not in killed_run["victim_log"]
    assert killed_run["after_kill"] == killed_run["before"]  # the table's log and files, byte for byte


@pytest.mark.slow  # a SIGKILL scenario
def test_rerun_after_sigkill_takes_over_the_lock_and_does_exactly_the_missing_work(killed_run):
    rerun, out = killed_run["rerun"], killed_run["out"]
    lock = killed_run["lock_holder"]
    assert lock["pid"] != os.getpid() and lock["holder"].startswith("scan pid ")
    assert rerun.returncode == Exit.OK, rerun.stderr[-3000:]  # the dead holder's lease did not have to run out
    assert "40 files, 30 processed, 10 unchanged" in rerun.stdout
    runs = [m["run_id"] for m in readers.manifests(out)]
    assert runs[0] == killed_run["committed_run"] and len(runs) == 2
    # Whatever files the killed run had written are gone; only the committed runs' folders are left.
    left = set(killed_run["prefixes_after_kill"]) - set(runs)
    assert killed_run["prefixes_after_rerun"] == sorted(runs)
    assert not left or f"removed the files of {len(left)} unfinished earlier run" in rerun.stderr
    current = assert_one_current_row_per_file(out, killed_run["files"])
    assert set(current["status"]) <= set(schema.OK_STATUSES)
    first_ten = current[current["path"].str.contains("/a")]
    assert set(first_ten["run_id"]) == {killed_run["committed_run"]}  # committed rows were not redone
    assert len(readers.read_all(out)) == 40  # no duplicates anywhere in history
    assert len(DeltaTable(locate(out).uri).to_pandas()) == 40  # what deltalake's readers see


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
    with caplog.at_level(logging.WARNING, logger="dogbreed.scan.job"):
        summary = run_scan(scan_config([root], out))
    done.set()
    assert len(killed) == 2, f"only killed {killed}: the run ended before both kills landed"
    assert summary.processed == 30 and summary.counts.get("error", 0) == 0
    assert_one_current_row_per_file(out, photos)
    assert len(readers.read_all(out)) == 30
    assert "lost to worker failures" not in caplog.text  # Ray retried the batches (a bounded number of times)


@pytest.mark.slow  # real processes, several seconds: the full suite (CI) runs it
def test_slow_photo_in_a_real_scan_becomes_an_error_row_and_its_batch_survives(ray_local, tmp_path, write_photo,
                                                                               scan_config):
    root, out = tmp_path / "photos", tmp_path / "out"
    small = [write_photo(root / f"s{i}.jpg", seed=i, size=(64, 48)) for i in range(4)]
    big = root / "s2_slow.jpg"  # its decoder takes a minute (the poison plugin's SLEEP)
    big.write_bytes(b"POISON:SLEEP\n" + bytes(64))
    plugin = str(Path(__file__).with_name("poison_plugin.py"))
    summary = run_scan(scan_config([root], out, **{"photos.timeout_s": 1.5, "decode.batch_size": 5,
                                                   "photos.plugins": [plugin]}))
    rows = assert_one_current_row_per_file(out, [*small, big]).set_index("path")
    assert rows.loc[str(big), "status"] == "error"
    assert rows.loc[str(big), "error"] == "decoder hung for over 1.5 s"
    assert set(rows.drop(str(big))["status"]) <= set(schema.OK_STATUSES)
    assert summary.exit_code == Exit.BAD_PHOTOS


# ---------------------------------------------------------------- 5. archive guard

@pytest.mark.slow  # real processes, several seconds: the full suite (CI) runs it
def test_missing_root_is_refused_with_code_4_and_nothing_changes(tmp_path, make_photos, commit_rows):
    out = tmp_path / "out"
    commit_rows(out, make_photos(tmp_path / "photos", 3), model_id=DEFAULT_MODEL_ID)
    before = snapshot(out)
    proc = cli("scan", str(tmp_path / "unmounted"), "--out", str(out), timeout=120)
    assert proc.returncode == Exit.REFUSED, proc.stderr
    assert "does not exist (is the archive mounted?)" in proc.stderr
    assert snapshot(out) == before


@pytest.mark.slow  # two CLI processes
def test_emptied_root_is_refused_unless_allowed(tmp_path, make_photos, commit_rows):
    root, out = tmp_path / "photos", tmp_path / "out"
    photos = make_photos(root, 3)
    commit_rows(out, photos, model_id=DEFAULT_MODEL_ID)
    for p in photos:
        p.unlink()
    before = snapshot(out)
    proc = cli("scan", str(root), "--out", str(out), timeout=120)
    assert proc.returncode == Exit.REFUSED, proc.stderr
    assert "is empty but earlier runs saw 3 files" in proc.stderr and "--allow-empty-roots" in proc.stderr
    assert snapshot(out) == before

    proc = cli("scan", str(root), "--out", str(out), "--allow-empty-roots", timeout=120)
    assert proc.returncode == Exit.OK, proc.stderr
    assert "deleted 3" in proc.stdout and readers.latest(out).empty


def test_unreadable_root_is_refused(tmp_path):
    """Root can read any folder, so the check runs in a child that drops to uid 65534 (nobody)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to drop privileges to uid 65534")
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="dogbreed_noroot_"))
    try:
        folder.chmod(0o700)  # owned by root: nobody may not list it
        code = ("import os, sys; from dogbreed.scan.listing import RootError, list_roots\n"
                "os.setgid(65534); os.setuid(65534)\n"
                "try:\n    list_roots([sys.argv[1]], False)\nexcept RootError as e:\n    print('refused:', e)\n")
        proc = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True,
                              timeout=120, cwd="/")
    finally:
        shutil.rmtree(folder)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == f"refused: root {folder} is not readable"


# ---------------------------------------------------------------- 7. for analysts

@pytest.mark.slow  # real processes, several seconds: the full suite (CI) runs it
def test_latest_keeps_the_newest_row_per_photo_over_many_runs(tmp_path, commit_rows):
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
    current = readers.latest(out)
    expected = {p: r for p, r in newest.items() if p not in {str(g) for g in gone}}
    assert dict(zip(current["path"], current["run_id"])) == expected
