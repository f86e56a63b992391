"""Faces (YuNet and Haar), dog score, top-k and the decision rule."""

import importlib.util
import io
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dogbreed.config import ConfigError, FaceConfig, ScanConfig
from dogbreed.vision import decision, faces
from dogbreed.vision.decision import settings_id
from dogbreed.vision.decode import decode
from dogbreed.vision.preprocessing import Preprocessing

SAMPLES = Path(__file__).resolve().parents[1] / "dogbreed" / "samples"
HAVE_YUFACE = importlib.util.find_spec("yuface") is not None


@pytest.mark.parametrize("status, score, faces", [
    ("dog", 0.9, 0), ("dog_and_human", 0.5, 2), ("human", 0.49, 1), ("neither", 0.1, 0),
])
def test_decide(status, score, faces):
    assert decision.decide(score, faces, 0.5) == status


def test_a_dog_top1_class_counts_even_below_the_mass_threshold():
    p = np.zeros((1, 1000), dtype=np.float32)
    p[0, 273], p[0, 274], p[0, 272] = 0.35, 0.33, 0.32  # dingo first, mass spread over wild canids
    assert decision.top1_is_dog(p, [273]).tolist() == [True]
    assert decision.decide(0.35, 0, 0.5, top1_is_dog=True) == "dog"


def test_dog_score_is_mass_on_dog_classes():
    p = np.zeros((2, 1000), dtype=np.float32)
    p[0, 151], p[0, 207], p[0, 0] = 0.3, 0.3, 0.4
    p[1, 270] = 1.0  # a wolf is not a dog
    assert decision.dog_scores(p, list(range(151, 269))).tolist() == pytest.approx([0.6, 0.0])


def test_top_k_order_and_names():
    probs = np.array([[0.1, 0.7, 0.2]])
    assert decision.top_k(probs, ["a", "b", "c"], 2) == [[("b", pytest.approx(0.7)), ("c", pytest.approx(0.2))]]


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=92, **kw)
    return buf.getvalue()


def _faces(data: bytes, cfg: FaceConfig, face_side: int = 640):
    d = decode(data, Preprocessing().geometry(face_side))
    return d, faces.detect_faces(d.small, d.small_to_full, cfg)


DETECTORS = [pytest.param("haar", id="haar"),
             pytest.param("yunet", id="yunet", marks=pytest.mark.skipif(not HAVE_YUFACE, reason="no yuface here"))]


@pytest.mark.parametrize("detector", DETECTORS)
@pytest.mark.parametrize("sample", ["grace_hopper.jpg", "astronaut.png"])
def test_each_detector_finds_the_face_in_full_size_coordinates(detector, sample):
    w, h = Image.open(SAMPLES / sample).size
    # A small face copy (200 px) forces a real rescale back to full-size pixels.
    cfg = FaceConfig(detector=detector, min_size=20, min_neighbors=3)
    d, boxes = _faces((SAMPLES / sample).read_bytes(), cfg, face_side=200)
    assert d.small_to_full > 2
    assert len(boxes) == 1
    x, y, fw, fh, score = boxes[0]
    assert 0 <= x and x + fw <= w and 0 <= y and y + fh <= h
    assert fw > 80  # a face of ~100-220 px in the original, not the ~40-75 px it has in the copy
    if detector == "yunet":
        assert 0.9 <= score <= 1.0
    else:
        assert score is None  # Haar cascades give no confidence


@pytest.mark.skipif(not HAVE_YUFACE, reason="no yuface here")
def test_yunet_finds_a_face_rotated_by_30_degrees_and_haar_does_not():
    img = Image.open(SAMPLES / "grace_hopper.jpg").rotate(30, resample=Image.Resampling.BICUBIC, expand=True)
    data = _jpeg(img)
    _, haar = _faces(data, FaceConfig(detector="haar"))
    _, upright_only = _faces(data, FaceConfig(rotate_deg=0))
    d, boxes = _faces(data, FaceConfig())
    assert haar == [] and upright_only == []  # too tilted for Haar, and for one upright YuNet pass
    assert len(boxes) == 1
    x, y, fw, fh, score = boxes[0]
    assert score >= 0.9
    # The face's centre in the rotated photo: the original centre (~267, ~227) turned 30 degrees about the middle.
    c, s = np.cos(np.radians(30)), np.sin(np.radians(30))
    ox, oy = 267 - 256, 227 - 300
    ex, ey = img.width / 2 + c * ox + s * oy, img.height / 2 - s * ox + c * oy
    assert abs(x + fw / 2 - ex) < 30 and abs(y + fh / 2 - ey) < 30


@pytest.mark.parametrize("detector", DETECTORS)
def test_boxes_are_in_the_exif_upright_frame(detector):
    upright = Image.open(SAMPLES / "grace_hopper.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned a quarter; EXIF says to rotate 90 degrees clockwise for display
    cfg = FaceConfig(detector=detector)
    _, want = _faces(_jpeg(upright), cfg)
    d, got = _faces(_jpeg(upright.rotate(90, expand=True), exif=exif.tobytes()), cfg)
    assert (d.width, d.height) == upright.size
    assert len(want) == len(got) == 1
    assert np.allclose(want[0][:4], got[0][:4], atol=12)


@pytest.mark.parametrize("detector", DETECTORS)
def test_no_face_on_a_cup(detector):
    assert _faces((SAMPLES / "coffee.png").read_bytes(), FaceConfig(detector=detector))[1] == []


def test_without_yuface_yunet_falls_back_to_haar_once_where_settings_are_made_and_workers_never_guess(monkeypatch):
    monkeypatch.setitem(sys.modules, "yuface", None)  # what `import yuface` meets where it is not installed
    for cached in (faces._yuface, faces._warn_fallback):
        cached.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="needs the yuface package"):
            assert faces.resolved(FaceConfig()).detector == "haar"
        _, boxes = _faces((SAMPLES / "grace_hopper.jpg").read_bytes(), faces.resolved(FaceConfig()))
        assert len(boxes) == 1 and boxes[0][4] is None  # Haar's box: no score
        assert settings_id(ScanConfig()) == settings_id(ScanConfig(face={"detector": "haar"}))
        # A worker handed yunet where yuface is missing fails at start-up: it never writes rows claiming yunet.
        with pytest.raises(ConfigError, match="yuface package is not installed on this node"):
            faces.load_face_detector(FaceConfig(detector="yunet"))
    finally:
        monkeypatch.undo()  # yuface importable again (where installed), then forget the cached absence
        faces._yuface.cache_clear()
        faces._warn_fallback.cache_clear()
    if HAVE_YUFACE:
        assert faces.active_detector(FaceConfig()) == "yunet"
        assert settings_id(ScanConfig()) != settings_id(ScanConfig(face={"detector": "haar"}))
