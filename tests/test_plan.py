"""make_plan on hand-built Arrow tables, without Ray: what a run decodes, records directly, carries over and marks
deleted, and when the archive guard refuses; real files only where fingerprints are read.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from dogbreed.scan.listing import LISTING_SCHEMA
from dogbreed.scan.plan import KNOWN_COLUMNS, Plan, ScanRefused, make_plan
from dogbreed.table import schema
from dogbreed.vision.decode import fingerprint_file

ROOT = "/photos"
MODEL, SETTINGS = "model-a", "settings-a"
T0 = 1_700_000_000_123_456_789  # ns: a listing's mtime and ctime
SIZE = 1000
KNOWN = ["path", "run_id", *KNOWN_COLUMNS]  # what the scan reads of the latest rows (dogbreed.scan.job.KNOWN)


@pytest.fixture(scope="module")
def cfg(shrunk_config):
    return shrunk_config("scan", roots=[ROOT])


# ---------------------------------------------------------------- building the tables


def entry(path: str, size: int = SIZE, mtime_ns: int = T0, ctime_ns: int | None = T0, raw: bytes | None = None,
          note: tuple[str, str, str | None] | None = None) -> dict:
    """One listed file; `note` = (note_status, note, note_kind) when the listing already decided its row."""
    status, text, kind = note or (None, None, None)
    return {"path": path, "raw": raw, "size": size, "mtime_ns": mtime_ns, "ctime_ns": ctime_ns,
            "note_status": status, "note": text, "note_kind": kind}


def on_disk(path: Path) -> dict:
    """A real file as list_roots would list it."""
    st = os.stat(path)
    return entry(str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def listing(entries: list[dict], roots: Sequence[str] = (ROOT,)) -> pa.Table:
    rows = [{**e, "root": next(i for i, r in enumerate(roots) if e["path"].startswith(r + "/"))} for e in entries]
    return pa.Table.from_pylist(rows, schema=LISTING_SCHEMA)


def row(e: dict, status: str = "dog", run_id: str = "run-1", model_id: str | None = MODEL,
        settings_id: str | None = SETTINGS, error: str | None = None, error_kind: str | None = None,
        fingerprint: str | None = None, **changes) -> dict:
    """The latest committed row of a listed file, as a run that saw it as `e` wrote it."""
    r = {"path": e["path"], "run_id": run_id, "status": status, "error": error, "error_kind": error_kind,
         "model_id": model_id, "settings_id": settings_id, "size_bytes": e["size"], "mtime": e["mtime_ns"] // 1000,
         "ctime": None if e["ctime_ns"] is None else e["ctime_ns"] // 1000, "fingerprint": fingerprint}
    return {**r, **changes}


def known(rows: list[dict]) -> pa.Table:
    """Latest rows the way the scan reads them: KNOWN columns with SCHEMA's types, repeated strings dictionary-encoded."""
    fields = [schema.SCHEMA.field(name) for name in KNOWN]
    table = pa.Table.from_pylist(rows, schema=pa.schema(fields)) if rows else pa.schema(fields).empty_table()
    for name in schema.REPEATED:
        i = table.schema.get_field_index(name)
        table = table.set_column(i, name, pc.dictionary_encode(table.column(name)))
    return table


def remember(plan: Plan, run_id: str = "run-1") -> pa.Table:
    """What a run of `plan` committed: a current result for every photo, the decided row for every other file."""
    rows = [row(e, run_id=run_id) for e in _entries(plan.todo)]
    rows += [row(e, run_id=run_id, status=e["status"], error=e["error"], error_kind=e["error_kind"])
             for e in _entries(plan.direct)]
    return known(rows)


def _entries(table: pa.Table) -> list[dict]:
    return [{**r, "size": r["size_bytes"]} for r in table.to_pylist()]


def paths(table: pa.Table) -> list[str]:
    return table.column("path").to_pylist()


def plan_of(entries: list[dict], latest: list[dict] | pa.Table, cfg, roots: Sequence[str] = (ROOT,), **overrides) -> Plan:
    latest = latest if isinstance(latest, pa.Table) else known(latest)
    return make_plan(listing(entries, roots), list(roots), latest, MODEL, SETTINGS,
                     cfg.model_copy(update=overrides) if overrides else cfg)


LOOP = ("error", "symlink loop: it points to a folder that contains it", "permanent")
FIRST_RUN = [entry(f"{ROOT}/a.jpg"), entry(f"{ROOT}/sub/B.JPG"), entry(f"{ROOT}/notes.txt"), entry(f"{ROOT}/README"),
             entry(f"{ROOT}/loop", note=LOOP)]


# ---------------------------------------------------------------- first run, rerun, changes


def test_a_first_run_decodes_every_photo_and_records_the_other_files_directly(cfg):
    plan = plan_of(FIRST_RUN, [], cfg)
    assert paths(plan.todo) == [f"{ROOT}/a.jpg", f"{ROOT}/sub/B.JPG"]  # extensions match whatever their case
    assert plan.direct.select(["path", "status", "error", "error_kind"]).to_pylist() == [
        {"path": f"{ROOT}/notes.txt", "status": "skipped", "error": "not a photo extension (.txt)", "error_kind": None},
        {"path": f"{ROOT}/README", "status": "skipped", "error": "not a photo extension (none)", "error_kind": None},
        {"path": f"{ROOT}/loop", "status": "error", "error": LOOP[1], "error_kind": "permanent"},
    ]
    assert (plan.listed, plan.unchanged, plan.carried.num_rows, plan.deleted) == (5, 0, 0, [])
    assert plan.files_per_root == {ROOT: 5}


def test_a_name_ending_in_a_control_character_is_skipped_with_a_one_line_reason(cfg):
    plan = plan_of([entry(f"{ROOT}/trail.jpg\n"), entry(f"{ROOT}/esc.jp\x1bg")], [], cfg)
    assert plan.todo.num_rows == 0
    assert plan.direct.column("error").to_pylist() == ["not a photo extension (none)"] * 2


def test_an_unchanged_rerun_has_nothing_to_do(cfg):
    latest = remember(plan_of(FIRST_RUN, [], cfg))
    plan = plan_of(FIRST_RUN, latest, cfg)
    assert (plan.todo.num_rows, plan.direct.num_rows, plan.carried.num_rows, plan.deleted) == (0, 0, 0, [])
    assert plan.unchanged == 5


def test_plain_string_columns_plan_the_same_as_dictionary_encoded_ones(cfg):
    latest = remember(plan_of(FIRST_RUN, [], cfg))
    plain = latest.cast(pa.schema([schema.SCHEMA.field(name) for name in KNOWN]))
    changed = [entry(f"{ROOT}/a.jpg", size=SIZE + 1), *FIRST_RUN[1:]]
    assert paths(plan_of(changed, plain, cfg).todo) == paths(plan_of(changed, latest, cfg).todo) == [f"{ROOT}/a.jpg"]


@pytest.mark.parametrize("change", [{"size": SIZE + 1}, {"mtime_ns": T0 + 1_000}, {"mtime_ns": T0 - 5_000_000_000}],
                         ids=["size", "mtime", "mtime-earlier"])
def test_a_changed_size_or_mtime_is_decoded_again(cfg, change):
    before = entry(f"{ROOT}/a.jpg")
    plan = plan_of([entry(f"{ROOT}/a.jpg", **change)], [row(before)], cfg)
    assert paths(plan.todo) == [f"{ROOT}/a.jpg"] and plan.unchanged == 0


def test_an_mtime_change_under_a_microsecond_is_not_a_change(cfg):
    """The table keeps microseconds: a listing's nanoseconds beyond them cannot tell two versions apart."""
    before = entry(f"{ROOT}/a.jpg", mtime_ns=T0 - T0 % 1000)
    plan = plan_of([entry(f"{ROOT}/a.jpg", mtime_ns=T0 - T0 % 1000 + 999)], [row(before)], cfg)
    assert plan.todo.num_rows == 0 and plan.unchanged == 1


def test_a_row_without_a_ctime_is_judged_by_size_and_mtime(cfg):
    """Object stores have no ctime: a null on either side never makes a file look changed."""
    e = entry(f"{ROOT}/a.jpg", ctime_ns=None)
    plan = plan_of([e], [row(e)], cfg)
    assert plan.todo.num_rows == 0 and plan.unchanged == 1


@pytest.mark.parametrize("made_by", [{"model_id": "model-b"}, {"settings_id": "settings-b"}, {"model_id": None}],
                         ids=["other-model", "other-settings", "no-model"])
def test_a_result_of_another_model_or_settings_is_decoded_again(cfg, made_by):
    e = entry(f"{ROOT}/a.jpg")
    plan = plan_of([e], [row(e, **made_by)], cfg)
    assert paths(plan.todo) == [f"{ROOT}/a.jpg"] and plan.unchanged == 0


@pytest.mark.parametrize("status, kind, retry_errors, again", [
    ("error", "permanent", False, False),
    ("error", "permanent", True, True),
    ("error", "transient", False, True),
    ("skipped", None, False, True),  # skipped a photo last time (a link not followed then): decode it now
    ("deleted", None, False, True),  # back where it had vanished from
])
def test_errors_are_retried_only_when_they_may_have_changed(cfg, status, kind, retry_errors, again):
    e = entry(f"{ROOT}/a.jpg")
    plan = plan_of([e], [row(e, status=status, error="it failed", error_kind=kind)], cfg, retry_errors=retry_errors)
    assert plan.todo.num_rows == int(again) and plan.unchanged == int(not again)


def test_a_permanent_error_is_not_retried_under_another_model(cfg):
    """A corrupt file stays corrupt whatever looks at it: only its change (or --retry-errors) retries it."""
    e = entry(f"{ROOT}/a.jpg")
    plan = plan_of([e], [row(e, status="error", error_kind="permanent", model_id="model-b", settings_id="b")], cfg)
    assert plan.todo.num_rows == 0


def test_mode_all_decodes_every_photo_but_rewrites_no_unchanged_direct_row(cfg):
    latest = remember(plan_of(FIRST_RUN, [], cfg))
    plan = plan_of(FIRST_RUN, latest, cfg, mode="all")
    assert paths(plan.todo) == [f"{ROOT}/a.jpg", f"{ROOT}/sub/B.JPG"]
    assert plan.direct.num_rows == 0 and plan.unchanged == 3


# ---------------------------------------------------------------- ctime moved: the fingerprint decides


@pytest.fixture
def photo_file(tmp_path) -> tuple[Path, dict]:
    """A real file and its listing entry, with the row a run left when its ctime was a second earlier."""
    path = tmp_path / "a.jpg"
    path.write_bytes(b"A" * 300_000)  # past two 64-KiB ends: the fingerprint reads both
    e = on_disk(path)
    return path, row(e, fingerprint=fingerprint_file(str(path)), ctime=(e["ctime_ns"] - 1_000_000_000) // 1000)


def test_a_new_ctime_with_the_same_content_is_carried_over(cfg, photo_file):
    path, latest = photo_file
    plan = plan_of([on_disk(path)], [latest], cfg, roots=[str(path.parent)])
    assert plan.todo.num_rows == 0
    assert plan.carried.select(["path", "src_path", "src_run"]).to_pylist() == [
        {"path": str(path), "src_path": str(path), "src_run": "run-1"}]
    assert (plan.unchanged, plan.moved, plan.deleted) == (0, 0, [])


def test_a_new_ctime_with_new_content_of_the_same_size_and_mtime_is_decoded(cfg, photo_file):
    path, latest = photo_file
    st = path.stat()
    path.write_bytes(b"A" * 299_999 + b"B")  # the tail changed: same size,
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the mtime put back (rsync -t, cp -p)
    plan = plan_of([on_disk(path)], [latest], cfg, roots=[str(path.parent)])
    assert paths(plan.todo) == [str(path)] and plan.carried.num_rows == 0


def test_a_new_ctime_without_a_fingerprint_on_record_is_decoded(cfg, photo_file):
    path, latest = photo_file
    plan = plan_of([on_disk(path)], [{**latest, "fingerprint": None}], cfg, roots=[str(path.parent)])
    assert paths(plan.todo) == [str(path)] and plan.carried.num_rows == 0


def test_a_name_that_is_not_utf8_is_fingerprinted_through_its_raw_bytes(cfg, tmp_path):
    raw = os.fsencode(tmp_path) + b"/caf\xe9.jpg"
    with open(raw, "wb") as f:
        f.write(b"photo bytes")
    st = os.stat(raw)
    text = raw.decode("utf-8", "backslashreplace")
    e = entry(text, st.st_size, st.st_mtime_ns, st.st_ctime_ns, raw=raw)
    latest = row(e, fingerprint=fingerprint_file(raw), ctime=st.st_ctime_ns // 1000 - 1_000_000)
    plan = plan_of([e], [latest], cfg, roots=[str(tmp_path)])
    assert plan.todo.num_rows == 0 and plan.carried.column("raw").to_pylist() == [raw]


def test_a_root_whose_name_spells_an_escape_still_sees_its_files_vanish(shrunk_config, tmp_path):
    """Its files' paths write that backslash as \\x5c: matched against the root as typed, nothing under it was ever
    deleted, and the empty-root guard never saw its files."""
    from dogbreed.scan.listing import list_roots, normalise_roots

    root = tmp_path / "archive\\x41"
    root.mkdir()
    for name in "abc":
        (root / f"{name}.jpg").write_bytes(b"x" * 100)
    roots = normalise_roots([str(root)]).roots
    config = shrunk_config("scan", roots=roots)
    first = make_plan(list_roots(roots), roots, known([]), MODEL, SETTINGS, config)
    latest = known([row(e) for e in _entries(first.todo)])
    (root / "c.jpg").unlink()
    plan = make_plan(list_roots(roots), roots, latest, MODEL, SETTINGS, config)
    assert plan.deleted == [str(tmp_path) + "/archive\\x5cx41/c.jpg"]
    for name in "ab":
        (root / f"{name}.jpg").unlink()
    with pytest.raises(ScanRefused, match="is empty but earlier runs saw 3 files"):
        make_plan(list_roots(roots), roots, latest, MODEL, SETTINGS, config)


# ---------------------------------------------------------------- vanished and moved files


def test_a_vanished_file_is_deleted_once_and_only_under_a_scanned_root(cfg):
    a, b, c = (entry(f"{ROOT}/{n}.jpg") for n in "abc")
    latest = [row(a), row(b), row(c),
              row(entry(f"{ROOT}/gone-before.jpg"), status="deleted"),  # recorded deleted by an earlier run
              row(entry("/elsewhere/d.jpg"))]  # under a root this run does not scan
    plan = plan_of([a, b], latest, cfg)
    assert plan.deleted == [f"{ROOT}/c.jpg"]
    assert plan.todo.num_rows == 0 and plan.unchanged == 2


def test_a_root_that_shares_a_prefix_with_another_folder_keeps_its_files(cfg):
    """/photos2/x.jpg does not lie under /photos: its row is not marked deleted by a scan of /photos."""
    a = entry(f"{ROOT}/a.jpg")
    plan = plan_of([a], [row(a), row(entry(f"{ROOT}2/x.jpg"))], cfg)
    assert plan.deleted == []


def moved_tree(tmp_path: Path, n: int, moved: int) -> tuple[list[dict], list[dict]]:
    """n photos known under old/; the first `moved` of them renamed into new/ (same size, mtime and content)."""
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    new.mkdir()
    latest = []
    for i in range(n):
        path = old / f"p{i}.jpg"
        path.write_bytes(bytes([i]) * 2000)  # equal sizes: only the fingerprint tells them apart
        os.utime(path, ns=(T0, T0))
        latest.append(row(on_disk(path), fingerprint=fingerprint_file(str(path))))
    for i in range(moved):
        os.rename(old / f"p{i}.jpg", new / f"p{i}.jpg")
    listed = [on_disk(p) for folder in (new, old) for p in sorted(folder.iterdir())]
    return listed, latest


def test_a_moved_file_is_carried_over_from_where_it_was(cfg, tmp_path):
    listed, latest = moved_tree(tmp_path, n=3, moved=1)
    plan = plan_of(listed, latest, cfg, roots=[str(tmp_path)])
    assert plan.todo.num_rows == 0
    assert plan.carried.select(["path", "src_path", "src_run"]).to_pylist() == [
        {"path": str(tmp_path / "new" / "p0.jpg"), "src_path": str(tmp_path / "old" / "p0.jpg"), "src_run": "run-1"}]
    assert plan.moved == 1 and plan.deleted == [str(tmp_path / "old" / "p0.jpg")]  # the old path gets a deleted row


def test_moves_do_not_count_towards_the_deletion_guard(cfg, tmp_path):
    listed, latest = moved_tree(tmp_path, n=10, moved=8)  # 8 of 10 gone from old/, over max_deleted_fraction 0.5
    plan = plan_of(listed, latest, cfg, roots=[str(tmp_path)])
    assert plan.moved == 8 and plan.carried.num_rows == 8 and plan.todo.num_rows == 0
    assert len(plan.deleted) == 8


def test_a_new_file_with_a_vanished_ones_size_and_mtime_but_other_content_is_decoded(cfg, tmp_path):
    listed, latest = moved_tree(tmp_path, n=3, moved=1)
    new = tmp_path / "new" / "p0.jpg"
    new.write_bytes(b"\xff" * 2000)
    os.utime(new, ns=(T0, T0))
    plan = plan_of([on_disk(new), *listed[1:]], latest, cfg, roots=[str(tmp_path)])
    assert paths(plan.todo) == [str(new)] and plan.carried.num_rows == 0 and plan.moved == 0


def test_mode_all_decodes_a_moved_file_again(cfg, tmp_path):
    listed, latest = moved_tree(tmp_path, n=3, moved=1)
    plan = plan_of(listed, latest, cfg, roots=[str(tmp_path)], mode="all")
    assert plan.todo.num_rows == 3 and plan.carried.num_rows == 0 and plan.moved == 0


# ---------------------------------------------------------------- the archive guard


def test_an_emptied_root_is_refused_unless_allowed(cfg):
    latest = [row(entry(f"{ROOT}/{n}.jpg")) for n in "abc"]
    other = entry("/more/x.jpg")  # a second root still has its file
    with pytest.raises(ScanRefused, match=rf"^root {ROOT} is empty but earlier runs saw 3 files there"):
        plan_of([other], latest, cfg, roots=[ROOT, "/more"])
    plan = plan_of([other], latest, cfg, roots=[ROOT, "/more"], allow_empty_roots=True)
    assert plan.deleted == [f"{ROOT}/{n}.jpg" for n in "abc"] and plan.files_per_root == {ROOT: 0, "/more": 1}


def test_a_root_never_seen_before_may_be_empty(cfg):
    plan = plan_of([], [row(entry("/elsewhere/a.jpg"))], cfg)
    assert plan.listed == 0 and plan.deleted == []


@pytest.mark.parametrize("vanished, refused", [(5, False), (6, True)])
def test_more_than_max_deleted_fraction_vanishing_is_refused(cfg, vanished, refused):
    files = [entry(f"{ROOT}/p{i:02d}.jpg") for i in range(10)]
    if refused:
        with pytest.raises(ScanRefused, match=rf"root {ROOT}: 6 of 10 known files vanished, over the max_deleted_fraction"):
            plan_of(files[vanished:], [row(e) for e in files], cfg)
    else:
        assert len(plan_of(files[vanished:], [row(e) for e in files], cfg).deleted) == vanished


def test_allow_deletions_accepts_a_mass_deletion(cfg):
    files = [entry(f"{ROOT}/p{i:02d}.jpg") for i in range(10)]
    plan = plan_of(files[9:], [row(e) for e in files], cfg, allow_deletions=True)
    assert len(plan.deleted) == 9


def test_the_deletion_guard_leaves_small_roots_alone(cfg):
    """Under ten known files a root may lose most of them: the guard is about unmounted archives, not tidying."""
    files = [entry(f"{ROOT}/p{i}.jpg") for i in range(9)]
    assert len(plan_of(files[8:], [row(e) for e in files], cfg).deleted) == 8


# ---------------------------------------------------------------- rows decided by the listing


def test_a_direct_row_is_rewritten_only_when_what_it_says_changed(cfg):
    same, grown = entry(f"{ROOT}/same.txt"), entry(f"{ROOT}/grown.txt")
    loop = entry(f"{ROOT}/link", note=LOOP)
    outside = entry(f"{ROOT}/was-a-photo.jpg", note=("skipped", "symlink (follow_symlinks: none)", None))
    latest = [row(same, status="skipped", error="not a photo extension (.txt)"),
              row(grown, status="skipped", error="not a photo extension (.txt)"),
              row(loop, status="skipped", error="symlink (follow_symlinks: none)"),  # said something else last time
              row(outside)]  # decoded last time
    plan = plan_of([same, entry(f"{ROOT}/grown.txt", size=SIZE + 1), loop, outside], latest, cfg)
    assert paths(plan.direct) == [f"{ROOT}/grown.txt", f"{ROOT}/link", f"{ROOT}/was-a-photo.jpg"]
    assert plan.direct.column("status").to_pylist() == ["skipped", "error", "skipped"]
    assert plan.unchanged == 1 and plan.todo.num_rows == 0


def test_a_time_before_1970_rounds_one_way_for_the_writer_and_the_planner():
    """-1500 ns was -2 us where rows were written and -1 us where the plan compared: changed every night."""
    ns = pa.array([-1500, 1500, None, -1000], pa.int64())
    assert schema.us_from_ns(ns).to_pylist() == [-2, 1, None, -1]
    written = schema.rows_to_table({"path": np.array(["/p/a.jpg"], dtype=object), "status": np.array(["neither"], dtype=object),
                                    "mtime_ns": np.array([-1500]), "ctime_ns": np.array([-1500])} | _decoded_columns(1),
                                   "run", "settings", None)
    assert pc.cast(written.column("mtime"), pa.int64()).to_pylist() == [-2]


def _decoded_columns(n: int) -> dict:
    return {"width": np.zeros(n, np.int32), "height": np.zeros(n, np.int32), "face_count": np.zeros(n, np.int32),
            "faces": np.array(["[]"] * n, dtype=object), "dog_score": np.zeros(n, np.float32),
            "breed_prob": np.zeros(n, np.float32), "breeds": np.array([[]] * n + [None], dtype=object)[:n]}
