"""list_roots, normalise_roots and check_root on real folders: walk order, hidden names, names that are not UTF-8,
symlinks (inside, all, none; loops, broken links) and roots that cannot be scanned.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dogbreed.scan.listing import LISTING_SCHEMA, RootError, check_root, list_roots, normalise_roots, text_path

OUTSIDE_NOTE = "symlink to a place outside the roots (follow_symlinks: inside)"


def rows(table) -> dict[str, dict]:
    """Each listed path -> its row."""
    return {r["path"]: r for r in table.to_pylist()}


def rel(table, base: Path) -> list[str]:
    return [os.path.relpath(p, base) for p in table.column("path").to_pylist()]


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------- plain folders


def test_each_folder_lists_its_files_by_name_then_its_subfolders_depth_first(tmp_path):
    for name in ["z.jpg", "a.jpg", "sub/b.jpg", "sub/deep/c.jpg", "sub/a2.jpg", "other/d.jpg", "m.png"]:
        touch(tmp_path / name)
    table = list_roots([str(tmp_path)])
    assert table.schema == LISTING_SCHEMA
    assert rel(table, tmp_path) == ["a.jpg", "m.png", "z.jpg", "other/d.jpg", "sub/a2.jpg", "sub/b.jpg", "sub/deep/c.jpg"]
    assert set(table.column("root").to_pylist()) == {0} and table.column("note_status").null_count == table.num_rows


def test_a_row_holds_the_files_size_mtime_and_ctime(tmp_path):
    path = touch(tmp_path / "a.jpg", b"12345")
    os.utime(path, ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    st = path.stat()
    (r,) = list_roots([str(tmp_path)]).to_pylist()
    assert (r["size"], r["mtime_ns"], r["ctime_ns"], r["raw"]) == (5, 1_600_000_000_123_456_789, st.st_ctime_ns, None)


def test_hidden_names_are_skipped_unless_include_hidden(tmp_path):
    for name in ["a.jpg", ".b.jpg", ".thumbs/c.jpg", "sub/.d.jpg"]:
        touch(tmp_path / name)
    assert rel(list_roots([str(tmp_path)]), tmp_path) == ["a.jpg"]
    assert rel(list_roots([str(tmp_path)], include_hidden=True), tmp_path) == [".b.jpg", "a.jpg", ".thumbs/c.jpg",
                                                                              "sub/.d.jpg"]


def test_a_name_that_is_not_utf8_keeps_its_raw_bytes_and_an_escaped_text_path(tmp_path):
    raw = os.fsencode(tmp_path) + b"/caf\xe9.jpg"
    with open(raw, "wb") as f:
        f.write(b"abc")
    touch(tmp_path / "caf\u00e9-utf8.jpg")
    by_path = rows(list_roots([str(tmp_path)]))
    latin = by_path[str(tmp_path) + "/caf\\xe9.jpg"]
    assert latin["raw"] == raw and latin["size"] == 3
    assert text_path(raw) == latin["path"]
    assert by_path[str(tmp_path / "caf\u00e9-utf8.jpg")]["raw"] is None  # valid UTF-8: the text path is exact


def test_a_name_spelling_an_escape_never_shares_the_text_path_of_a_name_that_is_not_utf8(tmp_path):
    """A name "caf\\xe9.jpg" typed by a user and caf<0xE9>.jpg from a Latin-1 share were one path: one row, swapped every run."""
    latin = os.fsencode(tmp_path) + b"/caf\xe9.jpg"
    with open(latin, "wb") as f:
        f.write(b"abc")
    touch(tmp_path / "caf\\xe9.jpg")
    touch(tmp_path / "back\\slash.jpg")  # a backslash that does not read as an escape stays as it is
    by_path = rows(list_roots([str(tmp_path)]))
    assert len(by_path) == 3
    assert by_path[str(tmp_path) + "/caf\\xe9.jpg"]["raw"] == latin
    assert by_path[str(tmp_path) + "/caf\\x5cxe9.jpg"]["raw"] == os.fsencode(tmp_path / "caf\\xe9.jpg")
    assert by_path[str(tmp_path / "back\\slash.jpg")]["raw"] is None
    names = [b"a\\xe9", b"a\xe9", b"a\\x5cxe9", b"a\\\\xe9", b"\\xE9\xff", b"\\\xe9", b"\\x5", b"\\xzz"]
    assert len({text_path(n) for n in names}) == len(names)


def test_several_roots_are_numbered_in_the_order_given(tmp_path):
    touch(tmp_path / "b" / "x.jpg")
    touch(tmp_path / "a" / "y.jpg")
    table = list_roots([str(tmp_path / "b"), str(tmp_path / "a")])
    assert list(zip(rel(table, tmp_path), table.column("root").to_pylist())) == [("b/x.jpg", 0), ("a/y.jpg", 1)]


def test_a_fifo_a_socket_and_a_device_get_one_skipped_row_each_and_are_never_opened(tmp_path):
    """A FIFO named x.jpg used to get no row at all; opening one would block until a writer came."""
    import socket

    touch(tmp_path / "a.jpg")
    os.mkfifo(tmp_path / "x.jpg")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "s.jpg"))
    (tmp_path / "null.jpg").symlink_to("/dev/null")  # a character device, through a link inside the roots
    try:
        by_path = rows(list_roots([str(tmp_path)], follow="all"))
    finally:
        sock.close()
    assert by_path[str(tmp_path / "a.jpg")]["note_status"] is None
    for name, kind in (("x.jpg", "a FIFO"), ("s.jpg", "a socket"), ("null.jpg", "a character device")):
        row = by_path[str(tmp_path / name)]
        assert (row["note_status"], row["note"]) == ("skipped", f"not a regular file ({kind}); never opened"), name


# ---------------------------------------------------------------- symlinks


@pytest.fixture
def linked(tmp_path) -> tuple[Path, Path]:
    """A root with links of every kind, and a folder outside it."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    touch(root / "a.jpg", b"aaaa")
    touch(root / "sub" / "b.jpg")
    touch(outside / "o.jpg", b"outside")
    (root / "alias.jpg").symlink_to("a.jpg")  # a file inside the roots
    (root / "sub-again").symlink_to("sub")  # a second route to a folder walked anyway
    (root / "out.jpg").symlink_to(outside / "o.jpg")  # a file outside
    (root / "out-dir").symlink_to(outside)  # a folder outside
    return root, outside


def test_links_inside_the_roots_are_followed_once_and_links_outside_skipped_with_a_reason(linked):
    root, _ = linked
    table = list_roots([str(root)], follow="inside")
    by_path = rows(table)
    assert rel(table, root) == ["a.jpg", "alias.jpg", "out-dir", "out.jpg", "sub/b.jpg"]  # nothing twice via sub-again
    assert by_path[str(root / "alias.jpg")]["size"] == 4 and by_path[str(root / "alias.jpg")]["note_status"] is None
    for name in ("out.jpg", "out-dir"):
        assert (by_path[str(root / name)]["note_status"], by_path[str(root / name)]["note"]) == ("skipped", OUTSIDE_NOTE)


def test_follow_all_walks_a_link_outside_under_the_links_own_path(linked):
    root, _ = linked
    table = list_roots([str(root)], follow="all")
    assert rel(table, root) == ["a.jpg", "alias.jpg", "out.jpg", "sub/b.jpg", "out-dir/o.jpg"]
    assert rows(table)[str(root / "out.jpg")]["size"] == len(b"outside")
    assert table.column("note_status").null_count == table.num_rows


def test_follow_none_gives_every_link_a_skipped_row(linked):
    root, _ = linked
    by_path = rows(list_roots([str(root)], follow="none"))
    links = {p for p, r in by_path.items() if r["note_status"] == "skipped"}
    assert links == {str(root / n) for n in ("alias.jpg", "sub-again", "out.jpg", "out-dir")}
    assert {by_path[p]["note"] for p in links} == {"symlink (follow_symlinks: none)"}


def test_a_link_from_one_root_into_another_is_not_walked_twice(tmp_path):
    touch(tmp_path / "a" / "x.jpg")
    touch(tmp_path / "b" / "y.jpg")
    (tmp_path / "a" / "to-b").symlink_to(tmp_path / "b")
    table = list_roots([str(tmp_path / "a"), str(tmp_path / "b")])
    assert rel(table, tmp_path) == ["a/x.jpg", "b/y.jpg"]


def test_a_link_to_a_hidden_folder_is_walked_under_its_own_path(tmp_path):
    """The real folder is not listed (hidden), so the link is the only route to its files."""
    touch(tmp_path / ".store" / "x.jpg")
    (tmp_path / "album").symlink_to(".store")
    assert rel(list_roots([str(tmp_path)]), tmp_path) == ["album/x.jpg"]


@pytest.mark.parametrize("follow", ["inside", "all"])
def test_a_symlink_loop_gets_a_permanent_error_row(tmp_path, follow):
    touch(tmp_path / "sub" / "a.jpg")
    (tmp_path / "sub" / "up").symlink_to("..")
    (tmp_path / "self.jpg").symlink_to("self.jpg")  # a link to itself: ELOOP on stat
    by_path = rows(list_roots([str(tmp_path)], follow=follow))
    assert sorted(by_path) == [str(tmp_path / n) for n in ("self.jpg", "sub/a.jpg", "sub/up")]
    up, itself = by_path[str(tmp_path / "sub/up")], by_path[str(tmp_path / "self.jpg")]
    assert (up["note_status"], up["note_kind"]) == ("error", "permanent") and up["note"].startswith("symlink loop")
    assert (itself["note_status"], itself["note"], itself["note_kind"]) == ("error", "symlink loop", "permanent")


def test_a_broken_link_gets_a_transient_error_row(tmp_path):
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (r,) = list_roots([str(tmp_path)]).to_pylist()
    assert (r["path"], r["note_status"], r["note_kind"]) == (str(tmp_path / "gone.jpg"), "error", "transient")
    assert r["note"] == "broken symlink (its target does not exist)"


# ---------------------------------------------------------------- roots


def test_normalise_roots_resolves_dots_slashes_and_links_and_drops_roots_inside_others(tmp_path):
    for name in ("a/inner", "b", "c"):
        (tmp_path / name).mkdir(parents=True)
    (tmp_path / "link-to-c").symlink_to(tmp_path / "c")
    given = [f"{tmp_path}/b/", f"{tmp_path}/a/inner", f"{tmp_path}/b/../a", str(tmp_path / "link-to-c"), f"{tmp_path}/c"]
    roots = normalise_roots(given)
    assert roots.roots == [str(tmp_path / "b"), str(tmp_path / "a"), str(tmp_path / "c")]  # in the order given
    assert sorted(roots.dropped) == sorted([(f"{tmp_path}/a/inner", str(tmp_path / "a")),
                                            (f"{tmp_path}/c", str(tmp_path / "c"))])


def test_normalise_roots_does_not_mistake_a_shared_prefix_for_nesting(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos2").mkdir()
    roots = normalise_roots([str(tmp_path / "photos"), str(tmp_path / "photos2")])
    assert roots.roots == [str(tmp_path / "photos"), str(tmp_path / "photos2")] and roots.dropped == []


def test_a_missing_root_or_a_file_is_refused_with_one_sentence(tmp_path):
    touch(tmp_path / "file.jpg")
    with pytest.raises(RootError, match=rf"^root {tmp_path}/missing does not exist \(is the archive mounted\?\)$"):
        check_root(str(tmp_path / "missing"))
    with pytest.raises(RootError, match=rf"^root {tmp_path}/file.jpg is not a folder$"):
        check_root(str(tmp_path / "file.jpg"))
    check_root(str(tmp_path))  # a folder is fine


def test_list_roots_refuses_a_bad_root_before_listing_any(tmp_path):
    touch(tmp_path / "ok" / "a.jpg")
    with pytest.raises(RootError, match="does not exist"):
        list_roots([str(tmp_path / "ok"), str(tmp_path / "missing")])
