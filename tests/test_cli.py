"""The typer app end to end through typer's runner: same library functions, clear errors, exit codes."""

import json
import os
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dogbreed.cli import app

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "dogbreed" / "samples"
runner = CliRunner()


def test_predict_prints_the_dog_app_answers(tmp_path):
    # 06455, not 06457: YuNet takes 06457's frontal Labrador head for a face too (see README, detector table).
    r = runner.invoke(app, ["predict", str(SAMPLES / "Labrador_retriever_06455.jpg"), str(SAMPLES / "grace_hopper.jpg"),
                            str(SAMPLES / "coffee.png"), "--annotate", str(tmp_path / "ann")])
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()
    assert re.search(r"dog: Labrador retriever \(0\.8\d\)$", lines[0]), lines[0]
    assert "human: looks like " in lines[1] and lines[2].endswith("neither")
    assert len(list((tmp_path / "ann").glob("*.jpg"))) == 3


def test_predict_json_and_bad_file(tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a photo")
    r = runner.invoke(app, ["predict", "--json", str(bad), str(tmp_path / "missing.jpg"), str(SAMPLES / "coffee.png")])
    assert r.exit_code == 3, "a photo that cannot be read exits 3, as a scan with error rows does (it exited 0)"
    rows = [json.loads(line) for line in r.output.strip().splitlines()]
    assert rows[0]["status"] == "error" and rows[0]["error"] == "not a recognised image format"
    assert rows[1]["status"] == "error" and rows[1]["error"].startswith("no such file")
    assert rows[2]["status"] == "neither"


def test_bad_config_is_one_sentence_and_exit_2(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("inference:\n  batch_size: many\n")
    r = runner.invoke(app, ["scan", str(SAMPLES), "--out", str(tmp_path / "o"), "--config", str(cfg)])
    assert r.exit_code == 2
    assert "key 'inference.batch_size'" in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("plugin, reason", [("no_such_plugin_module", "no module named 'no_such_plugin_module'"),
                                            ("/nowhere/plugin.py", "the decoder plugin file /nowhere/plugin.py does not exist")])
@pytest.mark.parametrize("command", ["scan", "predict"])
def test_a_decoder_plugin_that_cannot_be_found_is_one_sentence_and_exit_2(tmp_path, plugin, reason, command):
    """It made every photo a transient error row (exit 3), run after run."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"photos:\n  plugins: [{plugin}]\n")
    args = ["scan", str(SAMPLES), "--out", str(tmp_path / "o")] if command == "scan" else ["predict", str(SAMPLES / "coffee.png")]
    r = runner.invoke(app, [*args, "--config", str(cfg)])
    assert r.exit_code == 2, r.output
    assert f"key 'photos.plugins': {reason}" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "o").exists()


def test_a_decoder_plugin_module_in_the_current_folder_is_found(tmp_path, monkeypatch):
    """The decoder children import from the current folder (`python -m`): the driver's check must find it there too."""
    (tmp_path / "my_codec_plugin.py").write_text("LOADED = True\n")
    (tmp_path / "c.yaml").write_text("photos:\n  plugins: [my_codec_plugin]\n")
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["predict", str(SAMPLES / "coffee.png"), "--config", "c.yaml"])
    assert r.exit_code == 0 and r.output.strip().endswith("neither"), r.output


def test_missing_model_is_exit_2(tmp_path):
    r = runner.invoke(app, ["predict", str(SAMPLES / "coffee.png"), "--model", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "does not exist" in r.output


def test_missing_root_is_refused_with_exit_4(tmp_path):
    r = runner.invoke(app, ["scan", str(tmp_path / "unmounted"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 4 and "does not exist" in r.output
    assert not (tmp_path / "o" / "_delta_log").exists() and not (tmp_path / "o" / "data").exists()


def test_unsupported_out_uri_is_one_sentence_exit_2_and_creates_nothing(tmp_path):
    r = runner.invoke(app, ["scan", str(SAMPLES), "--out", "ftp://host/out"])
    assert r.exit_code == 2 and r.output.strip() == (
        "error: --out ftp://host/out: ftp:// output is not supported; give a local folder, an s3:// or a gs:// URI")


def test_missing_bucket_is_one_sentence_exit_2(s3_out):
    r = runner.invoke(app, ["scan", str(SAMPLES), "--out", "s3://no-such-bucket-here/out"])
    assert r.exit_code == 2 and "bucket no-such-bucket-here does not exist" in r.output and "Traceback" not in r.output


@pytest.mark.shared_data
@pytest.mark.slow  # several seconds; the inner loop stays under 150 s, the full suite (CI) runs it
def test_evaluate_command(shared_data):
    r = runner.invoke(app, ["evaluate", "--json", str(shared_data / "humans"), str(shared_data / "other")])
    assert r.exit_code == 0, r.output
    figures = json.loads(r.output)
    assert figures["human_photos"] == 60 and figures["face_detected_in_human"] >= 0.95


def test_latest_of_a_folder_without_a_scan_is_one_sentence(tmp_path):
    r = runner.invoke(app, ["latest", str(tmp_path / "nothing")])
    assert r.exit_code == 2
    assert "holds no committed scan run" in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("args", [
    ["latest", "{out}", "--csv", "{tmp}/folder.csv"],  # a folder: IsADirectoryError traceback
    ["latest", "{out}", "--csv", "{tmp}/no/such/folder/x.csv"],  # pandas' OSError traceback
    ["latest", "{out}", "--parquet", "{tmp}/folder.parquet"],
    ["report", "{out}", "--html", "{tmp}/folder.html"],
])
def test_an_output_file_that_cannot_be_written_is_one_sentence_and_exit_2(tmp_path, commit_rows, args):
    out = tmp_path / "table"
    commit_rows(out, [SAMPLES / "coffee.png"])
    for folder in ("folder.csv", "folder.parquet", "folder.html"):
        (tmp_path / folder).mkdir()
    r = runner.invoke(app, [a.format(out=out, tmp=tmp_path) for a in args])
    assert r.exit_code == 2, r.output
    assert r.output.strip().splitlines()[-1].startswith("error: cannot write ") and "Traceback" not in r.output


@pytest.mark.parametrize("args, reason", [
    (["latest", "{out}", "--csv", "{photo}"], "give a file name ending in .csv"),
    (["latest", "{out}", "--parquet", "{photo}"], "give a file name ending in .parquet"),
    (["report", "{out}", "--html", "{photo}"], "give a file name ending in .html or .htm"),
    (["latest", "{out}", "--parquet", "{out}/data/x.parquet"], "lies inside the table"),
    (["report", "{out}", "--html", "{out}/r.html"], "lies inside the table"),
])
def test_an_output_file_is_never_a_photo_or_inside_the_table(tmp_path, commit_rows, args, reason):
    """latest --csv and report --html overwrote a scanned photo, or the table's own log, and exited 0."""
    out, photo = tmp_path / "table", tmp_path / "lab.jpg"
    photo.write_bytes(b"my photo")
    commit_rows(out, [photo])
    before = sorted(p.name for p in out.rglob("*"))
    r = runner.invoke(app, [a.format(out=out, photo=photo) for a in args])
    assert r.exit_code == 2 and reason in r.output, r.output
    assert photo.read_bytes() == b"my photo" and sorted(p.name for p in out.rglob("*")) == before


def test_predict_annotate_into_a_file_is_one_sentence_and_exit_2(tmp_path):
    (tmp_path / "afile").write_text("mine")
    r = runner.invoke(app, ["predict", str(SAMPLES / "coffee.png"), "--annotate", str(tmp_path / "afile")])
    assert r.exit_code == 2 and "error: cannot write " in r.output, r.output
    assert (tmp_path / "afile").read_text() == "mine"


def test_every_error_type_has_one_exit_code_from_the_one_table():
    """Errors are classified by type (dogbreed.errors), never by the module they come from."""
    from dogbreed.breeds.folders import DataError
    from dogbreed.cluster.submit import SubmitError
    from dogbreed.config import ConfigError
    from dogbreed.errors import DogbreedError, Exit
    from dogbreed.report import ReportError
    from dogbreed.scan.job import ScanFailed
    from dogbreed.scan.listing import RootError
    from dogbreed.scan.plan import ScanRefused
    from dogbreed.table.location import OutputError
    from dogbreed.table.store import ScanLocked, StoreError
    from dogbreed.vision.nets import ModelError

    expected = {ConfigError: Exit.USAGE, ModelError: Exit.USAGE, OutputError: Exit.USAGE, DataError: Exit.USAGE,
                ReportError: Exit.USAGE, SubmitError: Exit.USAGE, RootError: Exit.REFUSED, ScanRefused: Exit.REFUSED,
                ScanLocked: Exit.LOCKED, ScanFailed: Exit.FAILED, StoreError: Exit.FAILED}
    for cls, code in expected.items():
        assert issubclass(cls, DogbreedError) and cls("x").exit_code == code, cls
    assert {int(e) for e in Exit} == {0, 1, 2, 3, 4, 5, 6, 7, 130}


def _fifo(tmp_path: Path) -> Path:
    import os

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    return fifo


@pytest.mark.parametrize("kind", ["device", "folder", "huge"])
def test_a_config_or_classes_file_that_is_no_text_file_is_one_sentence(tmp_path, kind):
    """/dev/zero was read until memory ran out; a folder or a huge file is refused by name too."""
    if kind == "huge":
        special = tmp_path / "big.yaml"
        with open(special, "wb") as f:
            f.truncate(64 << 20)  # sparse: 64 MiB of zeros read as one YAML scalar before
    else:
        special = {"device": Path("/dev/zero"), "folder": tmp_path}[kind]
    want = {"device": "larger than 4 mib", "folder": "it is a folder", "huge": "larger than 4 mib"}[kind]
    r = runner.invoke(app, ["scan", str(SAMPLES), "--out", str(tmp_path / "o"), "--config", str(special)])
    assert r.exit_code == 2 and f"cannot read config file {special}: " in r.output, r.output
    assert want in r.output.lower() and "Traceback" not in r.output
    r = runner.invoke(app, ["evaluate", str(SAMPLES), "--classes", str(special)])
    assert r.exit_code == 2 and f"cannot read the classes file {special}: " in r.output, r.output
    assert not (tmp_path / "o").exists()


@pytest.mark.timeout(60)  # opening a FIFO nobody writes blocked forever
def test_a_config_through_a_pipe_is_read_and_a_pipe_nobody_writes_is_one_sentence_not_a_hang(tmp_path, monkeypatch):
    """`--config <(...)`, /dev/stdin and a named pipe are read as written; a pipe nobody writes to is given up on."""
    import threading

    from dogbreed import errors
    from dogbreed.config import ScanConfig, load_config

    fifo = _fifo(tmp_path)
    writer = threading.Thread(target=lambda: (__import__("time").sleep(0.5), fifo.write_text("top_k: 3\n")))
    writer.start()  # it opens the pipe after the reader: the reader waits for it
    assert load_config(ScanConfig, fifo).top_k == 3
    writer.join()
    assert load_config(ScanConfig, "/dev/null").top_k == ScanConfig().top_k
    monkeypatch.setattr(errors, "PIPE_WAIT_S", 0.5)
    r = runner.invoke(app, ["scan", str(SAMPLES), "--out", str(tmp_path / "o"), "--config", str(fifo)])
    assert r.exit_code == 2 and r.output == f"error: cannot read config file {fifo}: nothing came through it for 0.5 s\n"


@pytest.mark.timeout(120)
def test_a_log_file_that_is_a_pipe_is_written_and_one_nobody_reads_is_a_warning_not_a_hang(tmp_path):
    """A FIFO nobody reads blocked the run on open; a pipe with a reader (/dev/stdout under Docker, `| tee`) must
    still get the log lines."""
    import os
    import select
    import threading

    fifo = _fifo(tmp_path)
    args = ["scan", str(tmp_path / "photos"), "--out", str(tmp_path / "o"), "--dry-run", "--log-file", str(fifo)]
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "coffee.png").write_bytes((SAMPLES / "coffee.png").read_bytes())
    r = runner.invoke(app, args)
    assert f"warning: cannot write the log file {fifo}: it is a named pipe that nobody reads" in r.output, r.output
    read: list[bytes] = []
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader, as tee would be

    def tee() -> None:
        while b"nothing written to" not in b"".join(read) and select.select([fd], [], [], 30)[0]:
            read.append(os.read(fd, 1 << 16))
            if not read[-1]:  # end of file: every writer closed the pipe
                break

    reader = threading.Thread(target=tee)
    reader.start()
    r = runner.invoke(app, args)
    reader.join(30)
    os.close(fd)
    assert "cannot write the log file" not in r.output and b"INFO dogbreed" in b"".join(read), (r.output, read)


LONG = "n" * 300  # over the 255 bytes a name that ext4, xfs, btrfs and tmpfs take


@pytest.mark.parametrize("args", [
    ["scan", str(SAMPLES), "--out", "{tmp}/" + LONG],
    ["scan", "{tmp}/" + LONG, "--out", "{tmp}/o"],
    ["scan", str(SAMPLES), "--out", "{tmp}/o", "--model", "{tmp}/" + LONG],
    ["latest", "{tmp}/" + LONG], ["check", "{tmp}/" + LONG], ["migrate", "{tmp}/" + LONG],
    ["train", "{tmp}/" + LONG, "--out", "{tmp}/m"], ["train", str(SAMPLES), "--out", "{tmp}/" + LONG],
], ids=["scan-out", "scan-root", "scan-model", "latest", "check", "migrate", "train-data", "train-out"])
def test_a_name_too_long_for_the_file_system_is_one_sentence_and_exit_2(tmp_path, args):
    """os.stat's ENAMETOOLONG was a traceback in most commands (a scan root: 'is the archive mounted?', exit 4)."""
    r = runner.invoke(app, [a.replace("{tmp}", str(tmp_path)) for a in args])
    assert r.exit_code == 2, (r.output, r.exception)
    assert "a name too long for the file system" in r.output and "…" in r.output and "Traceback" not in r.output
    assert len(r.output.splitlines()) == 1


@pytest.mark.parametrize("command", ["latest", "check", "report", "similar"])
def test_a_folder_that_is_no_table_is_named_so_to_readers(tmp_path, command):
    """Readers were told '--out … already holds …; give a new or empty folder', words for a scan's output."""
    (tmp_path / "notes.txt").write_text("mine")
    extra = {"report": ["--html", str(tmp_path.parent / "r.html")], "similar": [str(SAMPLES / "coffee.png")]}
    r = runner.invoke(app, [command, str(tmp_path), *extra.get(command, [])])
    assert r.exit_code == 2, r.output
    assert r.output == f"error: {tmp_path} is not a dogbreed table: it holds 'notes.txt', which dogbreed did not write\n"
    assert (tmp_path / "notes.txt").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_root_given_twice_is_named_so_not_as_lying_inside_itself(tmp_path):
    (tmp_path / "photos" / "inner").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "photos")
    photos = str(tmp_path / "photos")
    r = runner.invoke(app, ["scan", photos, f"{photos}/", str(tmp_path / "link"), f"{photos}/inner", "--out",
                            str(tmp_path / "o"), "--dry-run"])
    assert r.exit_code == 0 and "dry run: 0 files" in r.output, r.output
    said = [line.split(": ", 1)[1] for line in r.output.splitlines() if "scanned once" in line]
    assert sorted(said) == sorted([f"root {photos} is given twice (as {photos}/): its files are scanned once",
                                   f"root {photos} is given twice (as {tmp_path / 'link'}): its files are scanned once",
                                   f"root {photos}/inner lies inside root {photos}: its files are scanned once, through {photos}"])


@pytest.mark.parametrize("args", [["latest", "--csv"], ["latest", "--parquet"], ["report", "--html"]])
def test_an_export_named_as_a_link_to_a_device_is_refused_before_any_work(tmp_path, commit_rows, args):
    """A link full.csv -> /dev/full was written through (the exit-1 "disk full" case this test checked before); an
    export now replaces the file a link leads to, so a link to what is no such file is refused (exit 2). The full
    disk itself: tests/test_report.py (a real small tmpfs, and a write that fails half-way)."""
    out = str(tmp_path / "o")
    commit_rows(out, ["/p/a.jpg"])
    target = tmp_path / f"full.{args[1].lstrip('-')}"
    target.symlink_to("/dev/full")
    r = runner.invoke(app, [args[0], out, args[1], str(target)])
    assert r.exit_code == 2, r.output
    assert r.output.startswith(f"error: {target} is a link to /dev/full, which is no ."), r.output


def test_predict_annotate_keeps_every_copy_and_never_writes_over_a_photo_it_reads(tmp_path):
    """Two photos named x wrote one x.annotated.jpg, the second over the first; and a photo given as
    ann/x.annotated.jpg was overwritten by x's copy. A photo named x-2 keeps x-2.annotated.jpg for itself."""
    for sub in ("a", "b", "c", "ann"):
        (tmp_path / sub).mkdir()
    (tmp_path / "a" / "x.png").write_bytes((SAMPLES / "coffee.png").read_bytes())
    (tmp_path / "b" / "x.jpg").write_bytes((SAMPLES / "grace_hopper.jpg").read_bytes())
    (tmp_path / "c" / "x-2.png").write_bytes((SAMPLES / "chelsea_cat.png").read_bytes())
    given = (SAMPLES / "Brittany_02625.jpg").read_bytes()
    (tmp_path / "ann" / "x.annotated.jpg").write_bytes(given)
    photos = [tmp_path / "a" / "x.png", tmp_path / "b" / "x.jpg", tmp_path / "c" / "x-2.png", tmp_path / "ann" / "x.annotated.jpg"]
    r = runner.invoke(app, ["predict", *map(str, photos), "--annotate", str(tmp_path / "ann"), "--json"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "ann" / "x.annotated.jpg").read_bytes() == given
    rows = [json.loads(line) for line in r.output.splitlines() if line.startswith("{")]
    assert [Path(row["annotated"]).name for row in rows] == [
        "x-3.annotated.jpg", "x-4.annotated.jpg", "x-2.annotated.jpg", "x.annotated.annotated.jpg"]
    assert sorted(p.name for p in (tmp_path / "ann").iterdir()) == sorted(
        ["x.annotated.jpg", "x-2.annotated.jpg", "x-3.annotated.jpg", "x-4.annotated.jpg", "x.annotated.annotated.jpg"])
    assert f"note: the annotated copy of {photos[1]} is {tmp_path / 'ann' / 'x-4.annotated.jpg'}" in r.output


def test_predict_annotate_never_writes_through_a_link_or_into_a_hard_linked_photo(tmp_path):
    """An x.annotated.jpg in the folder that was a link to some other photo got the copy written over that photo;
    a hard link of a photo under that name shared the overwrite."""
    (tmp_path / "in").mkdir()
    (tmp_path / "ann").mkdir()
    (tmp_path / "in" / "x.png").write_bytes((SAMPLES / "coffee.png").read_bytes())
    victim, kept = tmp_path / "victim.jpg", (SAMPLES / "Brittany_02625.jpg").read_bytes()
    victim.write_bytes(kept)
    (tmp_path / "ann" / "x.annotated.jpg").symlink_to(victim)
    (tmp_path / "in" / "y.png").write_bytes((SAMPLES / "coffee.png").read_bytes())
    os.link(victim, tmp_path / "ann" / "y.annotated.jpg")
    r = runner.invoke(app, ["predict", str(tmp_path / "in" / "x.png"), str(tmp_path / "in" / "y.png"),
                            "--annotate", str(tmp_path / "ann"), "--json"])
    assert r.exit_code == 0, r.output
    assert victim.read_bytes() == kept  # neither through the link nor through the shared inode
    rows = [json.loads(line) for line in r.output.splitlines() if line.startswith("{")]
    assert [Path(row["annotated"]).name for row in rows] == ["x-2.annotated.jpg", "y.annotated.jpg"]
    assert (tmp_path / "ann" / "x.annotated.jpg").is_symlink()  # the user's link is left as it was
    assert not [p for p in os.listdir(tmp_path / "ann") if "dogbreed-tmp" in p]


@pytest.mark.timeout(120)
def test_predict_names_a_fifo_a_device_and_an_object_uri_as_the_scan_would(tmp_path):
    """A FIFO waited 73 s for 'decoder hung', /dev/zero was 'out of memory while decoding', and s3://bucket/x.jpg
    became the local path ./s3:/bucket/x.jpg that 'vanished before it could be read' (a URI Arrow cannot read
    stands for it here: it fails before any connection)."""
    fifo = _fifo(tmp_path)
    r = runner.invoke(app, ["predict", "--json", str(fifo), "/dev/zero", "http://127.0.0.1:9/x.jpg"])
    assert r.exit_code == 3, r.output
    rows = [json.loads(line) for line in r.output.splitlines() if line.startswith("{")]
    assert [row["path"] for row in rows] == [str(fifo), "/dev/zero", "http://127.0.0.1:9/x.jpg"]
    assert [row["error"] for row in rows[:2]] == ["not a regular file (a device, FIFO or socket); never opened"] * 2
    assert rows[2]["status"] == "error" and "vanished" not in rows[2]["error"]


def test_predict_prints_each_photo_on_one_line_and_its_json_is_strict_json(tmp_path):
    """A file named "x.jpg\\ncat.jpg: dog: Labrador retriever (0.99)\\ny.jpg" printed three lines, one a forged answer;
    --json wrote NaN (no JSON; node and strict parsers refuse it); a folder was "a device, FIFO or socket" and a file
    never there "vanished"."""
    odd = tmp_path / "x.jpg\ncat.jpg: dog: Labrador retriever (0.99)\ny.jpg"
    odd.write_bytes((SAMPLES / "Brittany_02625.jpg").read_bytes())
    (tmp_path / "folder").mkdir()
    given = [str(odd), str(tmp_path / "folder"), str(tmp_path / "never.jpg")]
    r = runner.invoke(app, ["predict", *given])
    assert r.exit_code == 3
    lines = r.output.strip().splitlines()
    assert lines == [f"{str(odd)!r}: dog: Brittany spaniel (0.95)", f"{tmp_path / 'folder'}: error: is a folder, not a file",
                     f"{tmp_path / 'never.jpg'}: error: no such file (missing, or removed before it could be read)"], lines

    def strict(constant):
        raise ValueError(f"{constant} is no JSON")

    r = runner.invoke(app, ["predict", *given, "--json"])
    rows = [json.loads(line, parse_constant=strict) for line in r.output.strip().splitlines()]
    assert [row["path"] for row in rows] == given and rows[0]["error"] is None and rows[2]["dog_score"] is None
    r = runner.invoke(app, ["predict", given[0], "--model", str(odd)])
    assert r.exit_code == 2 and "is a file, not a model folder" in r.output
