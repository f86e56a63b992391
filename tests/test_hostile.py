"""Hostile input: every odd file in an archive yields exactly one row with the right status and a one-line reason.

One real scan (Ray) over a corpus of bad, unusual and tricky files, plus fast checks through `Decoder` alone.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageOps

from dogbreed.config import PhotoConfig
from dogbreed.scan.job import run_scan
from dogbreed.table import readers, schema
from dogbreed.vision.predictors import Decoder
from dogbreed.vision.preprocessing import Preprocessing

REPO = Path(__file__).resolve().parents[1]
GRACE = REPO / "dogbreed" / "samples" / "grace_hopper.jpg"  # 512x600, one frontal face


@dataclass(frozen=True)
class Case:
    name: str  # path relative to the corpus root
    status: str  # "ok" (any real result), "error" or "skipped"
    reason: str | None = None  # a piece of the one-line reason


def _noise(size=(320, 240), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((12, 16, 3)) * 255).astype(np.uint8)).resize(size)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height and which has no pixel data: a decompression-bomb probe."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def _rotated_for_exif(upright: Image.Image, orientation: int) -> tuple[Image.Image, Image.Exif]:
    """Pixels stored turned, with the EXIF orientation that makes a viewer show them upright."""
    stored = upright.transpose({3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90,
                                8: Image.Transpose.ROTATE_270}[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    return stored, exif


def build_corpus(root: Path) -> list[Case]:
    """Write the hostile corpus under root; returns what each file must become."""
    root.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []

    def add(name: str, status: str, reason: str | None = None, data: bytes | None = None) -> Path:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if data is not None:
            path.write_bytes(data)
        cases.append(Case(name, status, reason))
        return path

    jpeg = io.BytesIO()
    _noise().save(jpeg, "JPEG", quality=90)
    add("zero.jpg", "error", "empty file", b"")
    add("truncated.jpg", "error", "truncated", jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    add("random.jpg", "error", "not a recognised image format", np.random.default_rng(1).bytes(4096))
    add("notes.txt", "skipped", "not a photo extension (.txt)", b"shopping list\nmilk\n")
    add("notes.jpg", "error", "not a recognised image format", b"shopping list\nmilk\n")
    add("bomb.png", "error", "decompression bomb", _png_header_only(100_000, 100_000))
    add("photo.heic", "error", "HEIC/HEIF file whose header cannot be read", b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64))
    _noise().convert("RGBA").save(add("alpha.png", "ok"))
    Image.fromarray((np.arange(240 * 320).reshape(240, 320) % 65536).astype(np.uint16)).save(add("deep16.png", "ok"))
    _noise().convert("L").save(add("gray.jpg", "ok"))
    _noise().convert("CMYK").save(add("cmyk.jpg", "ok"))
    _noise().convert("P", palette=Image.Palette.ADAPTIVE).save(add("palette.gif", "ok"))
    frames = [_noise(seed=s).convert("P", palette=Image.Palette.ADAPTIVE) for s in range(3)]
    frames[0].save(add("animated.gif", "ok"), save_all=True, append_images=frames[1:], duration=100, loop=0)
    pages = [_noise(seed=s) for s in range(3)]
    pages[0].save(add("pages.tif", "ok"), save_all=True, append_images=pages[1:])
    _noise().save(add("photo.webp", "ok"), "WEBP")
    _noise().save(add("UPPER.JPG", "ok"), "JPEG")
    stored, exif = _rotated_for_exif(Image.open(GRACE), 6)
    stored.save(add("rotated.jpg", "ok"), exif=exif.tobytes(), quality=95)
    for name in ("with space.jpg", "ünïcødé 照片.jpg", "new\nline.jpg", "x.jpg/inside.jpg"):
        _noise().save(add(name, "ok"), "JPEG")  # x.jpg is a folder: walked, no row of its own
    os.mkfifo(add("pipe.jpg", "skipped", "not a regular file (a FIFO); never opened"))  # once no row, or a hang
    os.symlink(".", add("loop", "error", "symlink loop"))
    os.symlink("self.jpg", add("self.jpg", "error", "symlink loop"))
    _noise().save(add("noperm.jpg", "ok" if os.geteuid() == 0 else "error", None if os.geteuid() == 0 else "permission"), "JPEG")
    os.chmod(root / "noperm.jpg", 0)  # root reads it anyway; the unprivileged check is test_unreadable_file...
    return cases


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[Case]]:
    root = tmp_path_factory.mktemp("hostile")
    return root, build_corpus(root)


@pytest.fixture(scope="module")
def scanned(corpus, ray_local, scan_config, tmp_path_factory):
    """One real scan over the corpus: (summary, every row written)."""
    root, _ = corpus
    out = tmp_path_factory.mktemp("hostile_out")
    summary = run_scan(scan_config([root], out, **{"decode.batch_size": 4, "inference.batch_size": 8}))
    return summary, readers.read_all(out)


def _problems(case: Case, status: str | None, error: str | None) -> list[str]:
    """What is wrong with one file's outcome (empty when it is right); status None is Decoder's "decoded"."""
    want_ok = case.status == "ok"
    if (status is None or status in schema.OK_STATUSES) != want_ok or (not want_ok and status != case.status):
        return [f"{case.name!r}: status {status} ({error}), expected {case.status}"]
    if want_ok:
        return [f"{case.name!r}: error {error!r} on a good photo"] if error else []
    if not error or "\n" in error or (case.reason and case.reason not in error):
        return [f"{case.name!r}: reason {error!r} should be one line containing {case.reason!r}"]
    return []


@pytest.mark.slow  # real processes, several seconds: the full suite (CI) runs it
def test_scan_gives_every_hostile_file_exactly_one_row_with_its_status(corpus, scanned):
    root, cases = corpus
    summary, rows = scanned
    assert rows["path"].is_unique, rows["path"][rows["path"].duplicated()].tolist()
    assert sorted(rows["path"]) == sorted(str(root / c.name) for c in cases)  # x.jpg (a folder) has no row
    outcome = {path: (status, None if pd.isna(error) else error)
               for path, status, error in rows[["path", "status", "error"]].values}
    problems = [p for c in cases for p in _problems(c, *outcome[str(root / c.name)])]
    assert not problems, "\n".join(problems)
    assert summary.exit_code == 3  # bad photos are reported to cron, not hidden
    assert rows["path_bytes"].isna().all(), "every name here is UTF-8: path_bytes is null (decoded rows had b'')"


@pytest.mark.slow  # shares the real scan of the hostile corpus with the test above
def test_scan_reports_oriented_size_and_face_boxes_inside_it(corpus, scanned):
    root, _ = corpus
    row = scanned[1].set_index("path").loc[str(root / "rotated.jpg")]
    assert (row["width"], row["height"]) == Image.open(GRACE).size  # upright frame, not the stored one
    assert row["face_count"] >= 1
    for box in row["faces"]:
        assert 0 <= box["x"] and box["x"] + box["w"] <= row["width"] and 0 <= box["y"] and box["y"] + box["h"] <= row["height"]


def _decode(paths: list[Path], **photos) -> dict[str, np.ndarray]:
    decoder = Decoder(Preprocessing(), photos=PhotoConfig(**photos))
    try:
        return decoder({"path": np.array([str(p) for p in paths], dtype=object)})
    finally:
        decoder.close()


def test_listing_plan_and_decoder_alone_give_each_hostile_file_its_status(corpus):
    """The same outcome without Ray: listing and planning decide skips and loops, the decoder the rest."""
    from dogbreed.config import ScanConfig
    from dogbreed.scan.listing import list_roots
    from dogbreed.scan.plan import make_plan
    from dogbreed.vision.decision import settings_id

    root, cases = corpus
    cfg = ScanConfig(roots=[str(root)], out="unused")
    plan = make_plan(list_roots([str(root.resolve())]), [str(root.resolve())], schema.empty_table(), "m", settings_id(cfg), cfg)
    got = {p: (s, e) for p, s, e in zip(plan.direct.column("path").to_pylist(), plan.direct.column("status").to_pylist(),
                                        plan.direct.column("error").to_pylist())}
    out = _decode(plan.todo.column("path").to_pylist())
    got.update({p: (s, e) for p, s, e in zip(out["path"], out["status"], out["error"])})
    problems = [p for c in cases for p in _problems(c, *got[str(root.resolve() / c.name)])]
    assert not problems, "\n".join(problems)


def _iou(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    iw, ih = max(0, min(ax + aw, bx + bw) - max(ax, bx)), max(0, min(ay + ah, by + bh) - max(ay, by))
    return iw * ih / (aw * ah + bw * bh - iw * ih)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied_before_face_detection(orientation, tmp_path):
    import json

    upright = Image.open(GRACE)
    upright.save(tmp_path / "upright.jpg", quality=95)
    stored, exif = _rotated_for_exif(upright, orientation)
    stored.save(tmp_path / "turned.jpg", quality=95, exif=exif.tobytes())
    assert ImageOps.exif_transpose(Image.open(tmp_path / "turned.jpg")).size == upright.size  # a viewer shows it upright

    out = _decode([tmp_path / "upright.jpg", tmp_path / "turned.jpg"])
    assert list(out["width"]) == [upright.width] * 2 and list(out["height"]) == [upright.height] * 2
    want, got = json.loads(out["faces"][0]), json.loads(out["faces"][1])
    assert len(want) == 1 and len(got) == 1, (want, got)
    assert _iou(want[0][:4], got[0][:4]) > 0.8, (want, got)  # x, y, w, h (then the score)


POISON_PLUGIN = str(Path(__file__).with_name("poison_plugin.py"))


@pytest.mark.parametrize("action, reason", [
    ("SEGV", "decoder crashed (SIGSEGV)"),
    ("ABORT", "decoder crashed (SIGABRT)"),
    ("KILL", "decoder was killed (SIGKILL; out of memory?)"),
    ("HANG", "decoder hung for over 2 s"),
    ("SLEEP", "decoder hung for over 2 s"),
    ("MEMORY", "out of memory while decoding (photos.max_memory_mb)"),
])
def test_a_photo_that_crashes_or_hangs_native_code_is_one_error_row_and_its_batch_survives(action, reason, tmp_path,
                                                                                           write_photo):
    poison = tmp_path / "poison.jpg"
    poison.write_bytes(f"POISON:{action}\n".encode() + bytes(64))
    small = [write_photo(tmp_path / f"s{i}.jpg", seed=i, size=(64, 48)) for i in range(3)]
    out = _decode([small[0], poison, *small[1:]], timeout_s=2, max_memory_mb=1024, plugins=[POISON_PLUGIN])
    assert list(out["status"]) == [None, "error", None, None], list(out["error"])
    assert out["error"][1] == reason
    assert out["error_kind"][1] == "permanent"  # not retried while the file is unchanged
    assert (out["width"][[0, 2, 3]] == 64).all()


def test_unreadable_file_is_an_error_row_for_an_unprivileged_reader(tmp_path_factory):
    """Root reads a chmod-000 file anyway, so the check runs in a child that drops to uid 65534 (nobody)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to drop privileges to uid 65534")
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="dogbreed_noperm_"))  # pytest's tmp folders are 0700: nobody could not enter
    try:
        folder.chmod(0o755)
        _noise().save(folder / "secret.jpg", "JPEG")
        _noise().save(folder / "warmup.jpg", "JPEG")
        (folder / "secret.jpg").chmod(0)
        # Import and warm up first: the interpreter's own files may not be readable by nobody.
        # The function the decoder's sandboxed child runs, set up as root, then called as nobody.
        code = ("import os, sys\n"
                "from dogbreed.vision.worker import PhotoTask, photo_worker\n"
                "from dogbreed.vision.geometry import Geometry\n"
                "from dogbreed.config import FaceConfig\n"
                "one = photo_worker(PhotoTask(Geometry(), face=FaceConfig()))\n"
                "one(os.fsencode(sys.argv[2]))\n"
                "os.setgid(65534); os.setuid(65534)\n"
                "out = one(os.fsencode(sys.argv[1]))\n"
                "print(out.ok, '|', out.error, '|', out.error_kind)\n")
        proc = subprocess.run([sys.executable, "-c", code, str(folder / "secret.jpg"), str(folder / "warmup.jpg")],
                              capture_output=True, text=True, timeout=120, cwd="/")
    finally:
        shutil.rmtree(folder)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "False | permission denied | transient"  # retried on the next run


@pytest.mark.slow  # a SIGKILL scenario
def test_a_decoder_child_hung_in_native_code_dies_with_its_decode_worker(tmp_path):
    """A killed decode worker must not leave its child hanging forever (it would never see stdin close)."""
    import time

    poison = tmp_path / "hang.jpg"
    poison.write_bytes(b"POISON:HANG\n" + bytes(64))
    code = ("import os, sys, threading, time, numpy as np\n"
            "from dogbreed.vision.predictors import Decoder\n"
            "from dogbreed.vision.preprocessing import Preprocessing\n"
            "from dogbreed.config import PhotoConfig\n"
            "d = Decoder(Preprocessing(), photos=PhotoConfig(plugins=[sys.argv[2]], timeout_s=600))\n"
            "threading.Thread(target=d, args=({'path': np.array([sys.argv[1]], dtype=object)},), daemon=True).start()\n"
            "while d.reader.sandbox.proc is None:\n"
            "    time.sleep(0.05)\n"
            "time.sleep(2)\n"  # the child is now stuck on the mutex
            "print(d.reader.sandbox.proc.pid, flush=True)\n"
            "os._exit(0)\n")  # the worker dies without any clean-up, as under SIGKILL
    proc = subprocess.run([sys.executable, "-c", code, str(poison), POISON_PLUGIN], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    child = int(proc.stdout.split()[-1])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and os.path.exists(f"/proc/{child}"):
        time.sleep(0.1)
    alive = os.path.exists(f"/proc/{child}")
    if alive:
        os.kill(child, 9)
    assert not alive, "the hung decoder child outlived its parent"
