"""Face detectors compared on a small labelled folder made here from the packaged sample photos."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dogbreed.cli import app
from dogbreed.config import ConfigError, ScanConfig
from dogbreed.evaluation.faces import compare_detectors, detector_table

SAMPLES = Path(__file__).resolve().parents[1] / "dogbreed" / "samples"
needs_yuface = pytest.mark.skipif(importlib.util.find_spec("yuface") is None, reason="no yuface here")


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("labelled")
    for folder, names in (("humans", ["grace_hopper.jpg", "astronaut.png"]),
                          ("other", ["coffee.png", "chelsea_cat.png"]),
                          ("dogs/Labrador_retriever", ["Labrador_retriever_06449.jpg", "Labrador_retriever_06455.jpg"])):
        (root / folder).mkdir(parents=True)
        for name in names:
            shutil.copy(SAMPLES / name, root / folder / name)
    return [str(root / "humans"), str(root / "other"), str(root / "dogs")]


@pytest.mark.slow  # two detectors over every photo twice
@needs_yuface
def test_compare_finds_rotated_faces_with_yunet_only(labelled):
    haar, yunet = compare_detectors(labelled, ScanConfig(), ["haar", "yunet"], rotate_degrees=30)
    assert (haar.detector, yunet.detector, yunet.ran_as) == ("haar", "yunet", "yunet")
    assert haar.photos == yunet.photos == {"human": 2, "dog": 2, "other": 2}
    assert haar.faces == yunet.faces == {"human": 1.0, "dog": 0.0, "other": 0.0}
    assert yunet.faces_rotated == {"human": 1.0, "dog": 0.0, "other": 0.0}
    assert haar.faces_rotated["human"] == 0.0  # Haar sees upright faces only
    assert haar.images_per_s > 0 and yunet.images_per_s > 0
    table = detector_table([haar, yunet], 30).splitlines()
    assert "humans 30°" in table[0] and table[1].startswith("haar") and table[2].startswith("yunet")
    assert yunet.flat()["face_detected_in_human_rotated"] == 1.0


def test_compare_defaults_to_the_configured_detector_without_rotation(labelled):
    (only,) = compare_detectors(labelled, ScanConfig(face={"detector": "haar"}))
    assert only.detector == "haar" and only.faces["human"] == 1.0 and only.faces_rotated == {}


@needs_yuface
def test_compare_rotated_humans_with_the_default_detector(labelled):
    (only,) = compare_detectors(labelled[:1], ScanConfig(), rotate_degrees=30)
    assert (only.detector, only.photos, only.faces, only.faces_rotated) == ("yunet", {"human": 2}, {"human": 1.0},
                                                                           {"human": 1.0})


def test_unknown_detector_and_empty_folders_are_one_sentence(labelled, tmp_path):
    with pytest.raises(ConfigError, match=r"^face\.detector: unknown detector 'mtcnn' \(use yunet or haar\)$"):
        compare_detectors(labelled, ScanConfig(), ["mtcnn"])
    with pytest.raises(ConfigError, match="no labelled photos"):
        compare_detectors([str(tmp_path)], ScanConfig())


@pytest.mark.slow  # loads the model and runs the whole pipeline once more
@needs_yuface
def test_evaluate_command_prints_rotated_figures_and_the_comparison(labelled):
    r = CliRunner().invoke(app, ["evaluate", *labelled, "--rotate", "30", "--detectors", "haar,yunet", "--json"])
    assert r.exit_code == 0, r.output
    figures = json.loads(r.output)
    assert figures["face_detector"] == "yunet" and figures["face_detected_in_human"] == 1.0
    assert figures["face_detected_in_human_rotated"] == 1.0
    assert [d["detector"] for d in figures["detectors"]] == ["haar", "yunet"]
    r = CliRunner().invoke(app, ["evaluate", *labelled, "--detectors", "haar,nope"])
    assert r.exit_code != 0 and "unknown detector 'nope'" in r.output and "Traceback" not in r.output


@pytest.mark.slow  # every labelled shared photo, upright and rotated
@pytest.mark.shared_data
@needs_yuface
def test_default_detector_meets_the_face_targets_on_the_shared_photos(shared_data):
    (yunet,) = compare_detectors([str(shared_data / "humans"), str(shared_data / "other"),
                                  str(shared_data / "imagewoof" / "val-unseen")], ScanConfig(), rotate_degrees=30)
    assert yunet.photos == {"human": 60, "dog": 200, "other": 48}
    assert yunet.faces["human"] >= 0.98 and yunet.faces_rotated["human"] >= 0.90
    assert yunet.faces["dog"] <= 0.03 and yunet.faces["other"] <= 0.03
    assert yunet.faces_rotated["dog"] <= 0.03 and yunet.faces_rotated["other"] <= 0.03
