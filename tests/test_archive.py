"""What real archives hold, on real processes: poison photos, any file name, reorganised folders, symlinks in and
out of the roots, odd roots, changed settings, restored mtimes, the retry policy, and what cron sees.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from dogbreed.errors import Exit
from dogbreed.scan.job import run_scan
from dogbreed.table import readers, schema

POISON_PLUGIN = str(Path(__file__).with_name("poison_plugin.py"))
DOGBREED = Path(sys.executable).with_name("dogbreed")


def _poison(path: Path, action: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(f"POISON:{action}\n".encode() + bytes(64))
    return path


def _current(out: Path) -> pd.DataFrame:
    cur = readers.latest(out)
    assert cur["path"].is_unique, cur["path"][cur["path"].duplicated()].tolist()
    return cur.set_index("path")


# ---------------------------------------------------------------- 1. poison photos in a real scan

@pytest.mark.slow  # native crashes in a real Ray scan; test_hostile covers the Decoder itself in the quick tier
def test_native_crash_and_hang_in_a_decode_worker_are_one_error_row_each_and_not_retried(ray_local, tmp_path,
                                                                                         make_photos, scan_config):
    root, out = tmp_path / "photos", tmp_path / "out"
    good = make_photos(root, 6)
    segv, hang, abort = _poison(root / "p001x.jpg", "SEGV"), _poison(root / "p003x.jpg", "HANG"), \
        _poison(root / "p004x.jpg", "ABORT")
    cfg = scan_config([root], out, **{"photos.plugins": [POISON_PLUGIN], "photos.timeout_s": 3,
                                      "decode.batch_size": 4})
    first = run_scan(cfg)
    assert first.exit_code == Exit.BAD_PHOTOS and first.counts.get("error") == 3
    cur = _current(out)
    assert sorted(cur.index) == sorted(str(p) for p in [*good, segv, hang, abort])
    assert cur.loc[str(segv), "error"] == "decoder crashed (SIGSEGV)"
    assert cur.loc[str(abort), "error"] == "decoder crashed (SIGABRT)"
    assert cur.loc[str(hang), "error"] == "decoder hung for over 3 s"
    assert set(cur.loc[[str(p) for p in good], "status"]) <= set(schema.OK_STATUSES)  # their batch-mates survived

    second = run_scan(cfg)  # the next night: an unchanged poison file is not tried again
    assert (second.processed, second.unchanged, second.exit_code) == (0, 9, Exit.OK)
    assert len(readers.read_all(out)) == 9

    forced = run_scan(cfg.model_copy(update={"retry_errors": True}))
    assert forced.processed == 3 and forced.counts.get("error") == 3


# ---------------------------------------------------------------- 2. any file name

@pytest.mark.slow  # real processes, several seconds: the full suite (CI) runs it
def test_a_name_that_is_not_utf8_gets_its_row_and_keeps_its_bytes(ray_local, tmp_path, write_photo, scan_config):
    root, out = tmp_path / "photos", tmp_path / "out"
    write_photo(root / "plain.jpg", seed=1)
    raw = os.fsencode(str(root)) + b"/caf\xe9.jpg"  # Latin-1 from an old Samba share
    with open(raw, "wb") as f:
        f.write((root / "plain.jpg").read_bytes())
    literal = root / "caf\\xe9.jpg"  # a UTF-8 name that spells the escape itself: once the same path as the other
    write_photo(literal, seed=2)
    summary = run_scan(scan_config([root], out))
    assert summary.exit_code == Exit.OK and summary.processed == 3
    cur = _current(out)
    text = str(root) + "/caf\\xe9.jpg"
    assert cur.loc[text, "status"] in schema.OK_STATUSES
    assert cur.loc[text, "path_bytes"] == raw and pd.isna(cur.loc[str(root / "plain.jpg"), "path_bytes"])
    assert cur.loc[text, "breed"] == cur.loc[str(root / "plain.jpg"), "breed"]  # the same photo, decoded
    spelled = cur.loc[str(root) + "/caf\\x5cxe9.jpg"]
    assert spelled["path_bytes"] == os.fsencode(literal) and spelled["fingerprint"] != cur.loc[text, "fingerprint"]
    assert len(cur) == 3 and run_scan(scan_config([root], out)).processed == 0  # recognised the next night: no swap


# ---------------------------------------------------------------- 4. reorganised archives

@pytest.mark.slow  # real processes, several seconds: the full suite (CI) runs it
def test_a_reorganised_archive_keeps_its_results_without_inference(ray_local, tmp_path, make_photos, scan_config):
    root, out = tmp_path / "photos", tmp_path / "out"
    photos = make_photos(root, 12)
    run_scan(scan_config([root], out))
    before = _current(out)
    (root / "2024").mkdir()
    for p in photos:
        p.rename(root / "2024" / p.name)  # every photo moves: a mass "deletion" the guard would have refused
    dry = run_scan(scan_config([root], out), dry_run=True)
    assert dry.processed == 0 and dry.carried == 12
    moved = run_scan(scan_config([root], out))
    assert (moved.processed, moved.carried, moved.counts.get("deleted")) == (0, 12, 12)
    after = _current(out)
    assert sorted(after.index) == sorted(str(root / "2024" / p.name) for p in photos)
    for p in photos:
        old, new = before.loc[str(p)], after.loc[str(root / "2024" / p.name)]
        assert (new["breed"], new["breed_prob"], new["status"]) == (old["breed"], old["breed_prob"], old["status"])
        assert new["run_id"] == moved.run_id
    assert readers.manifests(out)[-1]["counts"]["moved"] == 12
    assert run_scan(scan_config([root], out)).unchanged == 12


@pytest.mark.slow  # several scans or CLI processes
def test_a_mass_deletion_is_refused_until_the_override_flag(tmp_path, make_photos):
    from test_nightly import cli, commit_rows

    root, out = tmp_path / "photos", tmp_path / "out"
    photos = make_photos(root, 12)
    commit_rows(out, photos)
    for p in photos[:9]:
        p.unlink()
    log = tmp_path / "cron.log"
    proc = cli("scan", str(root), "--out", str(out), "--log-file", str(log), "--dry-run")
    assert proc.returncode == 4 and "pass --allow-deletions" in proc.stderr
    assert "refused (exit 4): root" in log.read_text()  # cron's log says it too, with the exit code
    proc = cli("scan", str(root), "--out", str(out), "--allow-deletions", "--dry-run")
    assert proc.returncode == Exit.OK and "record 9 as deleted" in proc.stdout


# ---------------------------------------------------------------- 5 + 6. symlinks and roots

@pytest.mark.slow  # real processes, several seconds: the full suite (CI) runs it
def test_symlinks_are_followed_only_inside_the_roots(ray_local, tmp_path, make_photos, write_photo, scan_config):
    root, out, outside = tmp_path / "photos", tmp_path / "out", tmp_path / "etc"
    inside = make_photos(root / "album", 2)
    write_photo(outside / "passwd.jpg", seed=9)
    os.symlink(root / "album", root / "again")  # a second route to a folder scanned already
    os.symlink(outside, root / "escape")  # a folder outside the roots
    os.symlink(outside / "passwd.jpg", root / "leak.jpg")  # a file outside the roots
    os.symlink(root, root / "album" / "loop")  # a true loop
    run_scan(scan_config([root], out))
    cur = _current(out)
    assert sorted(cur.index) == sorted([*map(str, inside), str(root / "escape"), str(root / "leak.jpg"),
                                        str(root / "album" / "loop")])
    assert (cur.loc[str(root / "escape"), "status"], cur.loc[str(root / "leak.jpg"), "status"]) == ("skipped", "skipped")
    assert "outside the roots" in cur.loc[str(root / "leak.jpg"), "error"]
    assert cur.loc[str(root / "album" / "loop"), "status"] == "error"
    assert "symlink loop" in cur.loc[str(root / "album" / "loop"), "error"]

    everything = run_scan(scan_config([root], out, follow_symlinks="all"))
    cur = _current(out)
    assert str(root / "escape" / "passwd.jpg") in cur.index and cur.loc[str(root / "leak.jpg"), "status"] != "skipped"
    assert everything.counts.get("error", 0) == 0  # the loop row is unchanged, so not written again


@pytest.mark.slow  # real processes, several seconds: the full suite (CI) runs it
def test_roots_are_normalised_and_overlapping_roots_count_each_file_once(ray_local, tmp_path, make_photos, scan_config):
    root, out = tmp_path / "photos", tmp_path / "out"
    photos = make_photos(root / "sub", 3)
    os.symlink(root, tmp_path / "mounted")
    given = [f"{root}/sub/..", f"{root}/", str(root / "sub"), str(tmp_path / "mounted")]
    summary = run_scan(scan_config(given, out))
    assert (summary.listed, summary.processed) == (3, 3)
    assert readers.manifests(out)[-1]["roots"] == [str(root.resolve())]
    assert sorted(_current(out).index) == sorted(str(p.resolve()) for p in photos)
    # Deletion tracking works through the odd spelling too: a vanished photo is recorded.
    photos[0].unlink()
    again = run_scan(scan_config([f"{root}/sub/../"], out))
    assert again.counts.get("deleted") == 1 and str(photos[0]) not in _current(out).index


# ---------------------------------------------------------------- 7 + 8. identity and the retry policy

@pytest.mark.slow  # three scans
def test_new_content_behind_a_restored_mtime_is_noticed(ray_local, tmp_path, make_photos, scan_config):
    root, out = tmp_path / "photos", tmp_path / "out"
    photos = make_photos(root, 3)
    run_scan(scan_config([root], out))
    st = photos[0].stat()
    with open(photos[0], "r+b") as f:  # new bytes, same size...
        f.seek(st.st_size // 2)
        byte = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(photos[0], ns=(st.st_atime_ns, st.st_mtime_ns))  # ...behind the old mtime (cp -p, rsync -t)
    os.chmod(photos[1], 0o600)  # a new ctime alone, same bytes: checked by fingerprint, not inferred
    assert photos[0].stat().st_mtime_ns == st.st_mtime_ns and photos[0].stat().st_size == st.st_size
    summary = run_scan(scan_config([root], out))
    assert (summary.processed, summary.carried, summary.unchanged) == (1, 1, 1)
    assert run_scan(scan_config([root], out)).unchanged == 3


@pytest.mark.slow  # several scans or CLI processes
def test_changed_settings_reprocess_and_rows_never_mix_settings(ray_local, tmp_path, make_photos, scan_config):
    root, out = tmp_path / "photos", tmp_path / "out"
    make_photos(root, 3)
    first = run_scan(scan_config([root], out))
    assert first.processed == 3
    for change in ({"dog_threshold": 0.3}, {"count_dingo_as_dog": False}, {"face.min_neighbors": 5}, {"top_k": 5}):
        again = run_scan(scan_config([root], out, **change))
        assert again.processed == 3, change
        cur = readers.latest(out)
        assert cur["settings_id"].nunique() == 1 and cur["run_id"].nunique() == 1, change
    assert run_scan(scan_config([root], out, top_k=5)).processed == 0


@pytest.mark.slow  # several scans
def test_transient_errors_are_retried_and_permanent_ones_are_not(ray_local, tmp_path, make_photos, scan_config):
    from test_nightly import commit_rows

    root, out = tmp_path / "photos", tmp_path / "out"
    photos = make_photos(root, 2)
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    run_scan(scan_config([root], out))
    assert _current(out).loc[str(root / "corrupt.jpg"), "error_kind"] == "permanent"
    # A transient error row (as a permission error or a lost worker leaves) for an unchanged photo:
    commit_rows(out, [photos[0]], status="error")
    store_rows = readers.read_all(out)
    assert store_rows["error_kind"].isna().iloc[-1]  # written without a kind: treated as transient
    again = run_scan(scan_config([root], out))
    assert again.processed == 1 and _current(out).loc[str(photos[0]), "status"] in schema.OK_STATUSES


# ---------------------------------------------------------------- 9 + 10 + 11. what cron and a person see

@pytest.mark.slow  # several scans or CLI processes
def test_under_cron_a_scan_prints_only_its_final_line(tmp_path, make_photos):
    root, out, log = tmp_path / "photos", tmp_path / "out", tmp_path / "cron.log"
    make_photos(root, 3)
    proc = subprocess.run([str(DOGBREED), "scan", str(root), "--out", str(out), "--log-file", str(log)],
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == Exit.OK, proc.stderr
    assert proc.stderr == ""
    assert len(proc.stdout.splitlines()) == 1 and proc.stdout.startswith("run ")
    assert proc.stdout.strip() in log.read_text()


@pytest.mark.slow  # several scans or CLI processes
def test_a_progress_bar_when_asked(ray_local, tmp_path, make_photos, scan_config, capsys):
    root, out = tmp_path / "photos", tmp_path / "out"
    make_photos(root, 5)
    run_scan(scan_config([root], out, progress=True))
    err = capsys.readouterr().err
    assert "5/5" in err and "photo/s" in err
    (root / "more.jpg").write_bytes((root / "p000.jpg").read_bytes())
    run_scan(scan_config([root], out, progress=False))
    assert "photo/s" not in capsys.readouterr().err


@pytest.mark.parametrize("out, message", [("ftp://host/x", "ftp:// output is not supported"),
                                          ("FILE", "is a file, not a folder")])
@pytest.mark.slow  # real processes, several seconds: the full suite (CI) runs it
def test_a_bad_out_is_one_sentence_and_exit_2_and_creates_nothing(tmp_path, make_photos, out, message):

    root = tmp_path / "photos"
    make_photos(root, 1)
    if out == "FILE":
        out = str(tmp_path / "file.txt")
        Path(out).write_text("not a folder")
    before = sorted(os.listdir(tmp_path))
    proc = subprocess.run([str(DOGBREED), "scan", str(root), "--out", out], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == before and not (tmp_path / "ftp:").exists()
