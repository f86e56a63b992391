"""A damaged table is one sentence naming the table, the version and the file; `dogbreed check` finds every kind of
damage and `--repair` mends it keeping the history, locally and on S3. Every command runs in a real process."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from deltalake import DeltaTable

from dogbreed.errors import Exit
from dogbreed.table.location import OutputError, locate
from dogbreed.table.objects import LOG_DIR
from tests.processes import cli


def _files(out: str) -> list[str]:
    return sorted(DeltaTable(out).get_add_actions(flatten=True).column("path").to_pylist())


def _runs(out: str) -> list[str]:
    """The data file of each run, oldest run first."""
    return sorted(_files(out), key=lambda name: name.split("/")[1])


def _damage(out: str, kind: str) -> tuple[int, str]:
    """Damage the table; returns the version and the file the sentence must name."""
    loc = locate(out)
    first, second = _runs(out)
    if kind == "missing data file":
        loc.fs.delete_file(loc.path(first))
        return 1, first
    if kind == "truncated data file":
        with loc.fs.open_input_stream(loc.path(second)) as f:
            head = f.read(2000)
        with loc.fs.open_output_stream(loc.path(second)) as f:
            f.write(head)
        return 1, second
    if kind == "missing log commit":
        loc.fs.delete_file(loc.path(LOG_DIR, f"{0:020d}.json"))
        return 0, f"{LOG_DIR}/{0:020d}.json"
    assert kind == "garbled log commit"
    with loc.fs.open_output_stream(loc.path(LOG_DIR, f"{1:020d}.json")) as f:
        f.write(b'{"commitInfo": {"timestamp": 17')  # cut short mid-write
    return 1, f"{LOG_DIR}/{1:020d}.json"


def _table(tmp_path: Path, out: str, commit_rows) -> str:
    photos = []
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (tmp_path / name).write_bytes(b"x")
        photos.append(tmp_path / name)
    commit_rows(out, photos[:2], status="dog")
    commit_rows(out, photos[2:], status="human")
    return out


def _one_sentence(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


# After repair: which rows survive. A lost data file loses only its rows; a lost log commit loses its version.
LEFT = {"missing data file": {"human": 1}, "truncated data file": {"dog": 2}, "missing log commit": {},
        "garbled log commit": {"dog": 2}}


@pytest.mark.parametrize("kind", list(LEFT))
@pytest.mark.slow  # real processes, several seconds: the full suite (CI) runs it
def test_damage_is_named_found_by_check_and_repaired_keeping_the_history(kind, tmp_path, commit_rows):
    out = _table(tmp_path, str(tmp_path / "out"), commit_rows)
    version, name = _damage(out, kind)

    latest = cli("latest", out)
    assert latest.returncode == Exit.USAGE
    sentence = _one_sentence(latest)
    assert out in sentence and f"version {version}" in sentence and name in sentence, sentence
    assert f"dogbreed check {out}" in sentence

    found = cli("check", out)
    assert found.returncode == Exit.FAILED, found.stdout + found.stderr
    assert "DAMAGED" in found.stdout and name in found.stdout and "--repair" in found.stdout

    fixed = cli("check", out, "--repair")
    assert fixed.returncode == Exit.OK, fixed.stdout + fixed.stderr
    again = cli("check", out)
    assert again.returncode == Exit.OK and "DAMAGED" not in again.stdout
    if not LEFT[kind]:  # no version left: said so, not "a new output"
        assert "no commits, but data/ holds 2 data file(s) of an earlier history" in again.stdout, again.stdout
    after = cli("latest", out, "--csv", str(tmp_path / "latest.csv"))
    if LEFT[kind]:
        assert after.returncode == Exit.OK, after.stderr
        assert f"{sum(LEFT[kind].values())} photos" in after.stderr
        for status, n in LEFT[kind].items():
            assert f"{status} {n}" in after.stderr
    else:  # version 0 itself was lost: no version is left, and the next scan starts over
        assert after.returncode == Exit.USAGE and "holds no committed scan run" in after.stderr
    if kind.endswith("data file"):  # repaired by a new version; the old ones are still in the history
        assert DeltaTable(out).version() == 2 and len(DeltaTable(out).history()) == 3
    if kind != "missing data file":  # what is damaged is moved aside, never deleted
        assert any(p.is_file() for p in (tmp_path / "out" / "_dogbreed" / "quarantine").rglob("*"))


def test_check_of_a_sound_table_says_ok_and_writes_nothing(tmp_path, commit_rows):
    out = _table(tmp_path, str(tmp_path / "out"), commit_rows)
    before = {p: p.stat().st_mtime_ns for p in Path(out).rglob("*")}
    proc = cli("check", out, "--deep")
    assert proc.returncode == Exit.OK and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr
    assert "version 1: 2 data files, 2 present and readable" in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in Path(out).rglob("*")} == before


def test_check_of_a_table_whose_log_was_deleted_does_not_call_it_a_new_output(tmp_path, commit_rows):
    from dogbreed.table.health import check

    out = _table(tmp_path, str(tmp_path / "out"), commit_rows)
    for commit in (tmp_path / "out" / LOG_DIR).glob("*.json"):
        commit.unlink()
    lines = check(locate(out)).lines()
    assert "a new output" not in "\n".join(lines)
    assert "no commits, but data/ holds 2 data file(s) of an earlier history" in lines[1]


def test_a_lost_checkpoint_whose_earlier_commits_were_cleaned_up_is_named_as_such(tmp_path, commit_rows):
    """compact checkpoints the log and cleans up old commits; then a deleted checkpoint was reported as commit 0."""
    from dogbreed.table.health import check, repair

    out = _table(tmp_path, str(tmp_path / "out"), commit_rows)
    commit_rows(out, [tmp_path / "a.jpg"], status="neither")
    DeltaTable(out).create_checkpoint()  # at version 2
    log = tmp_path / "out" / LOG_DIR
    for v in (0, 1):  # what cleanup_metadata does to commits past the log retention
        (log / f"{v:020d}.json").unlink()
    commit_rows(out, [tmp_path / "b.jpg"], status="dog")
    commit_rows(out, [tmp_path / "c.jpg"], status="dog")
    DeltaTable(out).create_checkpoint()  # at version 4
    sound = check(locate(out))
    assert sound.ok and sound.version == 4, sound.lines()
    for checkpoint in log.glob("*.checkpoint*.parquet"):
        checkpoint.unlink()
    found = check(locate(out))
    assert not found.ok and found.version is None, found.lines()  # version 3 cannot be read without version 2's
    text = "\n".join(found.lines())
    assert f"version 4 ({LOG_DIR}/{4:020d}.checkpoint.parquet) is missing" in text and ".json" not in text, text
    repair(locate(out), found)
    after = check(locate(out))
    assert after.ok and "no commits, but data/ holds" in after.lines()[1], after.lines()  # not "version 0 missing"


def test_check_refuses_what_is_not_a_dogbreed_table(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"x")
    proc = cli("check", str(tmp_path / "photos"))
    assert proc.returncode == Exit.USAGE and str(tmp_path / "photos") in _one_sentence(proc)
    assert "DAMAGED" not in proc.stdout
    proc = cli("check", "--repair", str(tmp_path / "photos"))  # said "--out ... already holds", an option never given
    assert proc.returncode == Exit.USAGE and _one_sentence(proc) == \
        f"error: {tmp_path / 'photos'} is not a dogbreed table: it holds 'a.jpg', which dogbreed did not write"
    assert os.listdir(tmp_path / "photos") == ["a.jpg"]


@pytest.mark.slow  # an S3 server; the same code as the local cases above
@pytest.mark.parametrize("kind", ["missing data file", "garbled log commit"])
def test_damage_on_s3_is_named_and_repaired(kind, tmp_path, s3_out, commit_rows):
    out = _table(tmp_path, s3_out, commit_rows)
    version, name = _damage(out, kind)
    sentence = _one_sentence(cli("latest", out))
    assert out in sentence and f"version {version}" in sentence and name in sentence, sentence
    assert cli("check", out).returncode == Exit.FAILED
    fixed = cli("check", out, "--repair")
    assert fixed.returncode == Exit.OK, fixed.stdout + fixed.stderr
    after = cli("latest", out)
    assert after.returncode == Exit.OK and f"{sum(LEFT[kind].values())} photos" in after.stderr, after.stderr
    loc = locate(out)
    kept = loc.fs.get_file_info(pafs.FileSelector(loc.path("_dogbreed", "quarantine"), recursive=True,
                                                  allow_not_found=True))
    assert (kind == "missing data file") or any(i.type == pafs.FileType.File for i in kept)


@pytest.mark.slow  # real processes, several seconds: the full suite (CI) runs it
def test_a_scan_on_a_damaged_table_stops_before_decoding_with_the_sentence(tmp_path, commit_rows):
    out = _table(tmp_path, str(tmp_path / "out"), commit_rows)
    _damage(out, "truncated data file")
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "d.jpg").write_bytes(b"x")
    proc = cli("scan", str(tmp_path / "new"), "--out", out, env=os.environ | {"RAY_ADDRESS": ""})
    assert proc.returncode == Exit.USAGE
    assert "is damaged at version 1" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("path", ["../victim.parquet", "%2E%2E/victim.parquet", "/abs/victim.parquet", "file:///x.parquet"])
def test_a_commit_naming_a_file_outside_the_table_is_damage_and_repair_never_moves_that_file(tmp_path, commit_rows, path):
    """check --repair moved a user's file (../victim.parquet, named by a hand-made commit) into the quarantine."""
    import json

    from dogbreed.table.health import check, repair

    out = _table(tmp_path, str(tmp_path / "out"), commit_rows)
    victim = tmp_path / "victim.parquet"
    victim.write_text("mine")
    add = {"add": {"path": path, "size": 4, "partitionValues": {}, "modificationTime": 1, "dataChange": True}}
    (tmp_path / "out" / LOG_DIR / f"{2:020d}.json").write_text(
        json.dumps({"commitInfo": {"timestamp": 1, "operation": "WRITE"}}) + "\n" + json.dumps(add) + "\n")
    health = check(locate(out))
    assert not health.ok and health.log.problem[0] == 2 and "names a data file outside the table" in health.log.problem[2]
    repair(locate(out), health)
    assert victim.read_text() == "mine" and not list((tmp_path / "out" / "_dogbreed").rglob("victim*"))
    assert check(locate(out)).ok and DeltaTable(out).version() == 1


def _checkpointed(tmp_path: Path, commit_rows) -> tuple[str, Path]:
    """Versions 0..3 with a checkpoint at 2 (as compact leaves it); latest: a neither, b dog, c dog."""
    out = _table(tmp_path, str(tmp_path / "out"), commit_rows)
    commit_rows(out, [tmp_path / "a.jpg"], status="neither")
    DeltaTable(out).create_checkpoint()
    commit_rows(out, [tmp_path / "c.jpg"], status="dog")
    return out, tmp_path / "out" / LOG_DIR


def _latest(out: str) -> dict[str, str]:
    from dogbreed.table import readers

    current = readers.latest(out)
    return {Path(p).name: s for p, s in zip(current["path"], current["status"])}


def _quarantined(tmp_path: Path) -> list[str]:
    """The log entries repair moved aside."""
    return sorted(p.name for p in (tmp_path / "out" / "_dogbreed" / "quarantine").glob(f"*/{LOG_DIR}/*"))


CHECKPOINT = f"{2:020d}.checkpoint.parquet"


@pytest.mark.parametrize("damage", ["lost", "truncated"])
def test_a_damaged_checkpoint_whose_commits_are_all_there_is_moved_aside_and_every_row_stays(tmp_path, commit_rows, damage):
    """check --repair moved every commit aside for a lost checkpoint (an empty table), and left a truncated one."""
    from dogbreed.table.health import check, repair

    out, log = _checkpointed(tmp_path, commit_rows)
    if damage == "lost":
        (log / CHECKPOINT).unlink()
    else:
        os.truncate(log / CHECKPOINT, 100)
    found = check(locate(out))
    text = "\n".join(found.lines())
    assert not found.ok and found.version == 3 and found.log.problem is None, text
    assert ("_last_checkpoint names checkpoint 2, which is missing" if damage == "lost" else
            f"{CHECKPOINT} cannot be read (not a whole Parquet file") in text, text
    assert "version 3: 4 data files, 4 present and readable" in text and "loses nothing" in text, text
    repair(locate(out), found)
    assert _quarantined(tmp_path) == sorted(["_last_checkpoint"] + ([CHECKPOINT] if damage == "truncated" else []))
    assert sorted(p.name for p in log.iterdir()) == [f"{v:020d}.json" for v in range(4)]  # every commit stays
    assert check(locate(out)).ok and _latest(out) == {"a.jpg": "neither", "b.jpg": "dog", "c.jpg": "dog"}


def test_a_damaged_checkpoint_whose_earlier_commits_were_cleaned_up_leaves_a_table_every_reader_opens(tmp_path, commit_rows):
    """Repair left the corrupt checkpoint in place and check said "a new output": no command could open the table."""
    from dogbreed.table.health import check, repair
    from dogbreed.table.output import Output

    out, log = _checkpointed(tmp_path, commit_rows)
    os.truncate(log / CHECKPOINT, 100)
    for v in (0, 1):  # what compact's log retention does
        (log / f"{v:020d}.json").unlink()
    found = check(locate(out))
    text = "\n".join(found.lines())
    assert not found.ok and found.version is None, text
    assert f"version 2 ({LOG_DIR}/{CHECKPOINT}) cannot be read" in text and "commits before it were cleaned up" in text
    repair(locate(out), found)
    assert list(log.iterdir()) == [] and CHECKPOINT in _quarantined(tmp_path)
    after = check(locate(out))
    assert after.ok and "no commits, but data/ holds 4 data file(s) of an earlier history" in after.lines()[1]
    with pytest.raises(OutputError, match="holds no committed scan run"):
        Output(out).require()


@pytest.mark.parametrize("hint", ['{"version":99,"size":3}', '{"vers'])
def test_a_stale_or_garbled_last_checkpoint_is_damage_and_repair_moves_only_it(tmp_path, commit_rows, hint):
    """check said ok while every scan was refused ("Had a _last_checkpoint hint but didn't find any checkpoints")."""
    from dogbreed.table.health import check, repair

    out, log = _checkpointed(tmp_path, commit_rows)
    (log / "_last_checkpoint").write_text(hint)
    found = check(locate(out))
    assert not found.ok and [name for name, _ in found.log.strays] == ["_last_checkpoint"], found.lines()
    repair(locate(out), found)
    assert _quarantined(tmp_path) == ["_last_checkpoint"] and (log / CHECKPOINT).is_file()
    assert check(locate(out)).ok and _latest(out) == {"a.jpg": "neither", "b.jpg": "dog", "c.jpg": "dog"}


def test_another_tables_commit_is_damage_and_readers_send_the_user_to_check(tmp_path, commit_rows):
    """A commit copied from another Delta table: check said ok, and latest was an IndexError traceback."""
    import shutil

    import pyarrow as pa
    from deltalake import write_deltalake

    from dogbreed.table import readers
    from dogbreed.table.health import DamagedTable, check, repair

    out = _table(tmp_path, str(tmp_path / "out"), commit_rows)
    write_deltalake(str(tmp_path / "foreign"), pa.table({"x": [1, 2, 3], "path": ["a", "b", "c"]}), name="other")
    shutil.copy(tmp_path / "foreign" / LOG_DIR / f"{0:020d}.json", tmp_path / "out" / LOG_DIR / f"{2:020d}.json")
    for part in (tmp_path / "foreign").glob("*.parquet"):
        shutil.copy(part, tmp_path / "out")
    with pytest.raises(DamagedTable, match=f"`dogbreed check {out}`"):
        readers.latest(out)
    from dogbreed.table.maintain import compact

    log_before = sorted(os.listdir(tmp_path / "out" / LOG_DIR))
    with pytest.raises(DamagedTable, match="damaged at version 2: .*another table's metadata"):
        compact(out, retention_hours=1)  # it folded the foreign rows into dogbreed's compacted file for good
    assert sorted(os.listdir(tmp_path / "out" / LOG_DIR)) == log_before
    found = check(locate(out))
    assert not found.ok and found.log.problem[0] == 2 and "another table's metadata (name 'other'" in found.log.problem[2]
    repair(locate(out), found)
    assert check(locate(out)).ok and DeltaTable(out).version() == 1 and _quarantined(tmp_path) == [f"{2:020d}.json"]
    assert _latest(out) == {"a.jpg": "dog", "b.jpg": "dog", "c.jpg": "human"}


def test_new_columns_added_by_a_later_dogbreed_are_not_another_tables_metadata(tmp_path, commit_rows):
    from deltalake import Field

    from dogbreed.table import deltalog, store
    from dogbreed.table.health import check

    assert deltalog.TABLE_NAME == store.TABLE_NAME
    out = _table(tmp_path, str(tmp_path / "out"), commit_rows)
    DeltaTable(out).alter.add_columns([Field("later", "string")])
    assert check(locate(out)).ok


def test_a_replayed_commit_that_adds_a_removed_file_again_is_damage(tmp_path, commit_rows):
    """A copy of an old commit as the next version re-adds a file compact removed: check said ok, latest doubled rows."""
    import shutil

    from dogbreed.table.health import check, repair
    from dogbreed.table.maintain import compact

    out = _table(tmp_path, str(tmp_path / "out"), commit_rows)
    compact(out, retention_hours=1)  # version 2 removes both files, adds one
    shutil.copy(tmp_path / "out" / LOG_DIR / f"{1:020d}.json", tmp_path / "out" / LOG_DIR / f"{3:020d}.json")
    found = check(locate(out))
    assert not found.ok and found.log.problem[0] == 3, found.lines()
    assert "again, which version 2 already removed (a copied or replayed commit?)" in found.log.problem[2]
    repair(locate(out), found)
    assert check(locate(out)).ok and _latest(out) == {"a.jpg": "dog", "b.jpg": "dog", "c.jpg": "human"}


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_a_log_entry_that_is_not_a_file_is_named_never_opened_and_moved_aside(tmp_path, commit_rows, kind):
    """check waited forever on a FIFO named like the next commit; latest answered from the version before it."""
    from dogbreed.table import readers
    from dogbreed.table.health import DamagedTable

    out = _table(tmp_path, str(tmp_path / "out"), commit_rows)
    entry = tmp_path / "out" / LOG_DIR / f"{2:020d}.json"
    os.mkfifo(entry) if kind == "fifo" else entry.mkdir()
    found = cli("check", out, timeout=60)  # a hang is a TimeoutExpired
    assert found.returncode == Exit.FAILED and f"DAMAGED log: version 2 ({LOG_DIR}/{entry.name}) is " in found.stdout
    with pytest.raises(DamagedTable, match=f"damaged at version 2: {LOG_DIR}/{entry.name} is "):
        readers.latest(out)
    fixed = cli("check", out, "--repair", timeout=60)
    assert fixed.returncode == Exit.OK, fixed.stdout + fixed.stderr
    assert not os.path.lexists(entry) and _quarantined(tmp_path) == [entry.name]
    assert _latest(out) == {"a.jpg": "dog", "b.jpg": "dog", "c.jpg": "human"}


def test_a_scan_stops_before_decoding_on_a_fifo_named_like_the_next_commit(tmp_path, commit_rows):
    """The scan decoded every photo, then said another writer had committed (exit 5), every night."""
    out = _table(tmp_path, str(tmp_path / "out"), commit_rows)
    os.mkfifo(tmp_path / "out" / LOG_DIR / f"{2:020d}.json")
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "d.jpg").write_bytes(b"x")
    proc = cli("scan", str(tmp_path / "new"), "--out", out, env=os.environ | {"RAY_ADDRESS": ""}, timeout=120)
    assert proc.returncode == Exit.USAGE, proc.stderr
    assert _one_sentence(proc).startswith(f"error: table {out} is damaged at version 2: {LOG_DIR}/{2:020d}.json is not a "
                                          "regular file")
