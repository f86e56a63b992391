"""Tests of dogbreed.report: labels, drawing, the HTML report, and the report as a real browser shows it."""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw

from dogbreed import report
from dogbreed.table import readers, schema
from dogbreed.table.output import Output
from tests.test_storage_faults import _fill

NASTY_NAME = 'photo <script>alert("x") & ünï 🐶\nline.jpg'  # a file name cannot hold "/"
NASTY_REASON = 'cannot identify image <script>alert("boom")</script> & "quotes"\nsecond line'
T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)


def _photo(path: Path, size=(400, 300), color=(200, 170, 120), orientation: int | None = None) -> Path:
    img = Image.new("RGB", size, color)
    ImageDraw.Draw(img).ellipse([size[0] // 4, size[1] // 4, size[0] * 3 // 4, size[1] * 3 // 4], fill=(90, 60, 30))
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    img.save(path, exif=exif.tobytes()) if path.suffix == ".jpg" else img.save(path)
    return path


def _row(path, status, breed=None, prob=None, faces=(), size=(400, 300), error=None, score=None, minutes=0):
    decoded = status in schema.OK_STATUSES
    return {
        "path": str(path), "status": status, "error": error,
        "width": size[0] if decoded else None, "height": size[1] if decoded else None,
        "dog_score": score if score is not None else ({"dog": 0.95, "dog_and_human": 0.8, "human": 0.05}.get(status, 0.1) if decoded else None),
        "breed": breed, "breed_prob": prob,
        "breeds": [{"breed": breed, "prob": prob}, {"breed": "Beagle", "prob": 0.01}] if breed else None,
        "face_count": len(faces) if decoded else None,
        "faces": [dict(zip("xywh", f)) for f in faces] if decoded else None,
        "model_id": "model-abc", "processed_at": T0 + timedelta(minutes=minutes),
    }


def _write_run(out: Path, run_id: str, rows: list[dict]) -> None:
    """One committed run of these rows, as a scan commits it (a Delta commit with its manifest)."""
    columns = {k: [r.get(k) for r in rows] for k in schema.SCHEMA.names}
    columns["run_id"] = [run_id] * len(rows)
    counts = {"files": len(rows)} | {s: sum(r["status"] == s for r in rows) for s in schema.STATUSES}
    with Output(out, write=True).writing(30) as session:
        with session.writer(run_id) as writer:
            writer.write(schema.to_table(columns))
        session.commit(writer, {
            "run_id": run_id, "model_id": "model-abc", "roots": [str(out.parent / "photos")],
            "started_at": "2025-01-01T00:00:00Z", "finished_at": "2025-01-01T00:01:00Z", "status": "committed",
            "counts": counts, "images_per_s": 12.345,
        })


@pytest.fixture()
def scan_out(tmp_path: Path) -> Path:
    """An output folder of two runs; the second re-scans one photo, deletes one, and adds errors."""
    photos = tmp_path / "photos"
    photos.mkdir()
    lab = _photo(photos / "lab.jpg")
    both = _photo(photos / "both.jpg", color=(120, 160, 200))
    person = _photo(photos / "person.jpg", size=(300, 400), color=(230, 200, 190))
    rotated = _photo(photos / "rotated.jpg", size=(400, 300), orientation=6)  # shown 300 wide, 400 tall
    nothing = _photo(photos / "coffee.png", color=(40, 40, 40))
    nasty = _photo(photos / NASTY_NAME, color=(180, 220, 180))
    gone = photos / "gone.jpg"  # listed as a dog, then deleted from disk before the report
    _write_run(tmp_path / "out", "20250101T000000Z-aaaa", [
        _row(lab, "neither", minutes=0),
        _row(gone, "dog", "Beagle", 0.7),
        _row(photos / "old.jpg", "dog", "Pug", 0.8),
    ])
    _write_run(tmp_path / "out", "20250102T000000Z-bbbb", [
        _row(lab, "dog", "Labrador retriever", 0.91, minutes=10),
        _row(both, "dog_and_human", "Golden retriever", 0.66, faces=[(250, 150, 80, 80)]),
        _row(person, "human", "Beagle", 0.40, faces=[(100, 120, 90, 90), (20, 300, 50, 50)], size=(300, 400)),
        _row(rotated, "human", "Pug", 0.30, faces=[(40, 250, 100, 100)], size=(300, 400)),
        _row(nothing, "neither"),
        _row(nasty, "dog", "Labrador retriever", 0.75),
        _row(photos / "old.jpg", "deleted", minutes=10),
        _row(photos / "broken <script>.jpg", "error", error=NASTY_REASON),
        _row(photos / "huge.tif", "skipped", error="larger than decode.max_bytes (300000000 > 200000000)"),
    ])
    return tmp_path / "out"


# ---- describe -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("row", "label"), [
    ({"status": "dog", "breed": "Labrador retriever", "breed_prob": 0.912}, "dog: Labrador retriever (0.91)"),
    ({"status": "human", "breed": "Beagle", "breed_prob": 0.4}, "human: looks like Beagle (0.40)"),
    ({"status": "dog_and_human", "breed": "Pug", "breed_prob": 0.5}, "dog and human: Pug (0.50)"),
    ({"status": "neither", "breed": "Pug", "breed_prob": 0.01}, "neither"),
    ({"status": "error", "error": "truncated\nfile"}, "error: truncated file"),
    ({"status": "skipped", "error": "too big"}, "skipped: too big"),
    ({"status": "dog", "breed": None, "breed_prob": float("nan")}, "dog"),
])
def test_describe_gives_one_line_label(row, label):
    assert report.describe(row) == label


def test_describe_reads_a_pandas_row_with_missing_values():
    row = pd.DataFrame({"status": ["error"], "error": [None], "breed_prob": [np.nan]}).iloc[0]
    assert report.describe(row) == "error"


# ---- annotate -----------------------------------------------------------------------------------------

def _changed(a: Image.Image, b: Image.Image, xy) -> bool:
    return int(np.abs(np.asarray(a, dtype=int)[xy[1], xy[0]] - np.asarray(b, dtype=int)[xy[1], xy[0]]).sum()) > 30


def test_annotate_outlines_face_box_and_leaves_its_inside_alone():
    plain = Image.new("RGB", (400, 400), (128, 128, 128))
    row = {"status": "human", "breed": "Beagle", "breed_prob": 0.4, "width": 400, "height": 400,
           "faces": [{"x": 200, "y": 200, "w": 100, "h": 100}]}
    drawn = report.annotate(plain, row)
    assert drawn.size == plain.size
    assert _changed(plain, drawn, (200, 250)) and _changed(plain, drawn, (299, 250))  # left and right edges
    assert not _changed(plain, drawn, (250, 250))  # inside the box
    assert not _changed(plain, drawn, (150, 250))  # outside it
    assert _changed(plain, drawn, (3, 3))  # the label's background in the corner


def test_annotate_scales_full_size_boxes_onto_a_thumbnail():
    thumb = Image.new("RGB", (200, 200), (128, 128, 128))
    row = {"status": "dog", "width": 400, "height": 400, "faces": [{"x": 200, "y": 200, "w": 100, "h": 100}]}
    drawn = report.annotate(thumb, row)
    assert _changed(thumb, drawn, (100, 125))  # full-size x=200 is thumbnail x=100
    assert not _changed(thumb, drawn, (125, 125))
    assert not _changed(thumb, drawn, (199, 199))


def test_annotate_applies_exif_orientation_before_drawing(tmp_path):
    path = _photo(tmp_path / "r.jpg", size=(400, 200), color=(128, 128, 128), orientation=6)
    row = {"status": "human", "width": 200, "height": 400, "faces": [{"x": 20, "y": 250, "w": 100, "h": 100}]}
    with Image.open(path) as raw:
        drawn = report.annotate(raw, row)
        upright = Image.open(path).transpose(Image.Transpose.ROTATE_270)
    assert drawn.size == (200, 400)
    assert _changed(upright, drawn, (20, 300)) and not _changed(upright, drawn, (70, 300))


# ---- build_report -------------------------------------------------------------------------------------

def test_report_shows_summary_charts_gallery_and_escaped_errors(scan_out, tmp_path):
    path = report.build_report(scan_out, tmp_path / "site" / "report.html", thumb_size=160)
    html = path.read_text(encoding="utf-8")
    current = readers.latest(scan_out)

    def card(key):
        return int(re.search(rf'data-count="{key}"><b>(\d+)</b>', html).group(1))

    assert card("files") == len(current) == 9
    assert (card("dog"), card("human"), card("dog_and_human"), card("neither")) == (3, 2, 1, 1)
    assert (card("error"), card("skipped"), card("with_dog")) == (1, 1, 4)
    assert "20250102T000000Z-bbbb" in html and "model-abc" in html and "12.3 images/s" in html
    for chart in ("breed-chart", "score-histogram"):
        assert re.search(rf'id="{chart}" src="data:image/png;base64,[A-Za-z0-9+/=]{{500,}}"', html)

    assert html.count('<figure class="tile"') == 7  # every decoded photo; errors and deleted rows are not tiles
    assert html.count('src="data:image/jpeg;base64,') == 6  # gone.jpg was deleted after its scan
    assert html.count('class="placeholder"') == 1 and "cannot show the photo now" in html
    assert 'data-breed="Labrador retriever"' in html and 'data-status="dog_and_human"' in html

    assert html.count("<script") == 1  # only the report's own filter script
    assert "&lt;script&gt;alert(&#34;boom&#34;)&lt;/script&gt; &amp; &#34;quotes&#34;" in html
    assert "photo &lt;script&gt;alert(&#34;x&#34;) &amp; ünï 🐶" in html  # NASTY_NAME, escaped
    assert "larger than decode.max_bytes" in html
    assert "old.jpg" not in html  # deleted photos are gone from the current answer


def test_report_gallery_is_capped_and_keeps_every_status(scan_out, tmp_path):
    html = report.build_report(scan_out, tmp_path / "r.html", max_gallery=4, thumb_size=64).read_text(encoding="utf-8")
    statuses = re.findall(r'<figure class="tile" data-status="(\w+)"', html)
    assert sorted(statuses) == ["dog", "dog_and_human", "human", "neither"]
    assert "4 of 7 decoded photos" in html


def test_report_shows_a_placeholder_for_a_photo_gone_since_the_scan(scan_out, tmp_path):
    (scan_out.parent / "photos" / "lab.jpg").unlink()
    html = report.build_report(scan_out, tmp_path / "r.html", thumb_size=64).read_text(encoding="utf-8")
    assert html.count('<figure class="tile"') == 7
    assert html.count('class="placeholder"') == 2


def test_report_of_a_run_without_a_decoded_photo_lists_its_errors(tmp_path):
    _write_run(tmp_path / "out", "r1", [_row("/x/a.jpg", "error", error="truncated"), _row("/x/b.heic", "skipped", error="no HEIC support")])
    html = report.build_report(tmp_path / "out", tmp_path / "r.html").read_text(encoding="utf-8")
    assert '<figure class="tile"' not in html and "0 of 0 decoded photos" in html
    assert "truncated" in html and "no HEIC support" in html and 'id="breed-chart" src="data:image/png' in html


def test_report_on_a_folder_without_runs_names_it(tmp_path):
    from dogbreed.table.location import OutputError

    with pytest.raises(OutputError, match=f"^{tmp_path} holds no committed scan run"):
        report.build_report(tmp_path, tmp_path / "r.html")


# ---- in a real browser --------------------------------------------------------------------------------

def _browser() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def _chromium(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}"]
    return subprocess.run([browser, *flags, *args], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=120, check=True)


@pytest.mark.skipif(_browser() is None, reason="no chromium on this machine (.ci/run installs Debian's chromium)")
def test_report_renders_and_filters_in_headless_chromium(scan_out, tmp_path):
    browser = _browser()
    page = report.build_report(scan_out, tmp_path / "report.html", thumb_size=160).resolve()

    dom = _chromium(browser, tmp_path / "profile1", "--dump-dom", page.as_uri() + "#status=human").stdout
    assert 'data-filtered="yes"' in dom  # the filter script ran
    tiles = re.findall(r'<figure class="tile" data-status="(\w+)"[^>]*?( hidden="")?>', dom)
    assert len(tiles) == 7
    assert sorted(s for s, hidden in tiles if not hidden) == ["human", "human"]
    assert '<span id="shown">2</span>' in dom
    assert len(re.findall(r'<img id="(breed-chart|score-histogram)" src="data:image/png', dom)) == 2

    shot = tmp_path / "shot.png"
    _chromium(browser, tmp_path / "profile2", f"--screenshot={shot}", "--window-size=1280,2000", page.as_uri())
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (2000, 1280)
    assert pixels.std() > 20  # not a blank page: text, charts and photos


def test_a_breed_name_with_dollar_signs_is_drawn_as_written():
    rows = pd.DataFrame({"status": ["dog"] * 3, "breed": ["$x^$ terrier", "a$b", r"$\frac{"]})
    fig = report.breed_chart(rows)
    fig.canvas.draw()  # mathtext would raise a ParseException here
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert r"\$x^\$ terrier" in labels  # escaped, so matplotlib prints the '$' itself


EXPORTS = {"csv": ["latest", "{out}", "--csv"], "parquet": ["latest", "{out}", "--parquet"], "html": ["report", "{out}", "--html"]}


def _export(out: Path, kind: str, target: Path):
    """`latest --csv/--parquet F` or `report --html F`, in process."""
    from typer.testing import CliRunner

    from dogbreed.cli import app

    return CliRunner().invoke(app, [a.format(out=out) for a in EXPORTS[kind]] + [str(target)])


def _holds_export(path: Path, kind: str) -> bool:
    if kind == "html":
        return "<html" in path.read_text(encoding="utf-8").lower()
    table = pd.read_csv(path) if kind == "csv" else pd.read_parquet(path)
    return list(table["path"]) == ["/p/a.jpg"]


def _leftovers(*folders: Path) -> list[str]:
    return [p.name for folder in folders for p in folder.iterdir() if "dogbreed-tmp" in p.name]


@pytest.fixture
def export_case(tmp_path, commit_rows):
    """A table of one row, and a folder with a photo that is not in it (an export named F must never reach it)."""
    out, photos = tmp_path / "table", tmp_path / "photos"
    photos.mkdir()
    photo = photos / "dog.jpg"
    photo.write_bytes((Path(report.__file__).parent / "samples" / "Brittany_02625.jpg").read_bytes())
    commit_rows(out, ["/p/a.jpg"])
    return out, photo, photo.read_bytes()


@pytest.mark.parametrize("kind", EXPORTS)
def test_an_export_named_f_through_a_link_to_a_photo_is_refused_and_the_photo_kept(export_case, tmp_path, kind):
    """`latest --parquet x.parquet`, x.parquet a link to a photo, wrote Parquet over the photo and exited 0."""
    out, photo, before = export_case
    target = tmp_path / f"x.{kind}"
    target.symlink_to(photo)
    r = _export(out, kind, target)
    assert r.exit_code == 2, r.output
    assert r.output.startswith(f"error: {target} is a link to {photo}, which is no .{kind}") and r.output.count("\n") == 1
    assert photo.read_bytes() == before and os.readlink(target) == str(photo)


@pytest.mark.parametrize("kind", EXPORTS)
def test_an_export_over_a_hard_link_of_a_photo_replaces_that_name_only(export_case, tmp_path, kind):
    """F a hard link of a photo: writing F in place truncated the photo (one file, two names)."""
    out, photo, before = export_case
    target = tmp_path / f"x.{kind}"
    os.link(photo, target)
    r = _export(out, kind, target)
    assert r.exit_code == 0, r.output
    assert photo.read_bytes() == before and photo.stat().st_nlink == 1
    assert _holds_export(target, kind) and not _leftovers(tmp_path)


@pytest.mark.parametrize("kind", EXPORTS)
def test_an_export_through_a_link_to_a_file_of_its_kind_replaces_that_file_whole(export_case, tmp_path, kind):
    """A link to a .csv elsewhere is updated where it leads, by a new file taking its name: a reader who has the old
    one open reads it whole (written in place, it read a truncated file overwritten under it)."""
    out, _, _ = export_case
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    real, target = elsewhere / f"shared.{kind}", tmp_path / f"x.{kind}"
    real.write_bytes(b"old export " * 1000)
    target.symlink_to(real)
    with open(real, "rb") as reader:
        r = _export(out, kind, target)
        assert r.exit_code == 0, r.output
        assert reader.read() == b"old export " * 1000
    assert target.is_symlink() and os.readlink(target) == str(real) and _holds_export(real, kind)
    assert not _leftovers(tmp_path, elsewhere)


@pytest.mark.parametrize("kind", EXPORTS)
def test_an_export_that_fails_midway_leaves_the_old_file_and_no_half_one(export_case, tmp_path, monkeypatch, kind):
    """A full disk midway through the write left a half file where the old export was (exit 1, as the README says)."""
    out, _, _ = export_case
    target = tmp_path / f"x.{kind}"
    target.write_bytes(b"yesterday's export")

    def half(self, arg, *args, **kwargs):  # df.to_csv(path, ...) or path.write_text(text, ...)
        (self if isinstance(self, Path) else Path(arg)).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    owner, method = {"csv": (pd.DataFrame, "to_csv"), "parquet": (pd.DataFrame, "to_parquet"), "html": (Path, "write_text")}[kind]
    monkeypatch.setattr(owner, method, half)
    r = _export(out, kind, target)
    assert r.exit_code == 1 and r.output == f"failed: cannot write {target}: No space left on device\n", r.output
    assert target.read_bytes() == b"yesterday's export" and not _leftovers(tmp_path)


@pytest.fixture
def small_disk(tmp_path) -> Path:
    """A real 256 KiB file system (tmpfs), unmounted afterwards; skips where mounting is not allowed."""
    folder = tmp_path / "small"
    folder.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)]
    if os.geteuid() != 0 or not shutil.which("mount") or subprocess.run(mount, capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root in a container that allows mounts")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.mark.parametrize("kind", EXPORTS)
def test_an_export_onto_a_full_disk_exits_1_and_keeps_the_old_file(export_case, small_disk, kind):
    """A full disk: exit 1, as the exit-code table says, and yesterday's export is still whole (it was truncated)."""
    out, _, _ = export_case
    target = small_disk / f"x.{kind}"
    target.write_bytes(b"yesterday's export")
    _fill(small_disk)  # to the last byte
    r = _export(out, kind, target)
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert r.output.startswith(f"failed: cannot write {target}: ") and "No space left on device" in r.output
    assert target.read_bytes() == b"yesterday's export" and not _leftovers(small_disk)
