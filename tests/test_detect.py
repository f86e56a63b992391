"""Faces, dog score, top-k and the decision rule."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dogbreed import detect
from dogbreed.config import FaceConfig
from dogbreed.images import decode
from dogbreed.models import Preprocessing

SAMPLES = Path(__file__).resolve().parents[1] / "dogbreed" / "samples"


@pytest.mark.parametrize("status, score, faces", [
    ("dog", 0.9, 0), ("dog_and_human", 0.5, 2), ("human", 0.49, 1), ("neither", 0.1, 0),
])
def test_decide(status, score, faces):
    assert detect.decide(score, faces, 0.5) == status


def test_a_dog_top1_class_counts_even_below_the_mass_threshold():
    p = np.zeros((1, 1000), dtype=np.float32)
    p[0, 273], p[0, 274], p[0, 272] = 0.35, 0.33, 0.32  # dingo first, mass spread over wild canids
    assert detect.top1_is_dog(p, [273]).tolist() == [True]
    assert detect.decide(0.35, 0, 0.5, top1_is_dog=True) == "dog"


def test_dog_score_is_mass_on_dog_classes():
    p = np.zeros((2, 1000), dtype=np.float32)
    p[0, 151], p[0, 207], p[0, 0] = 0.3, 0.3, 0.4
    p[1, 270] = 1.0  # a wolf is not a dog
    assert detect.dog_scores(p, list(range(151, 269))).tolist() == pytest.approx([0.6, 0.0])


def test_top_k_order_and_names():
    probs = np.array([[0.1, 0.7, 0.2]])
    assert detect.top_k(probs, ["a", "b", "c"], 2) == [[("b", pytest.approx(0.7)), ("c", pytest.approx(0.2))]]


def test_face_found_on_real_portrait_in_full_size_coordinates():
    data = (SAMPLES / "grace_hopper.jpg").read_bytes()
    w, h = Image.open(SAMPLES / "grace_hopper.jpg").size
    # A small face copy (200 px) forces a real rescale back to full-size pixels.
    d = decode(data, Preprocessing(), face_max_side=200)
    faces = detect.detect_faces(d.gray, d.gray_to_full, FaceConfig(max_side=200, min_size=20, min_neighbors=3))
    assert len(faces) == 1
    x, y, fw, fh = faces[0]
    assert 0 <= x and x + fw <= w and 0 <= y and y + fh <= h
    assert fw > 100  # the face is ~220 px wide in the 512x600 original, not ~75 px of the copy
    assert 100 < x + fw / 2 < 400 and 100 < y + fh / 2 < 400


def test_no_face_on_a_cup():
    d = decode((SAMPLES / "coffee.png").read_bytes(), Preprocessing())
    assert detect.detect_faces(d.gray, d.gray_to_full, FaceConfig()) == []
