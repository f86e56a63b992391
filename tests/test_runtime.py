"""The backbone in OpenVINO gives torch's answers on real photos: ImageNet top-1 equal on >= 99.5%, dog scores within
0.01 (in fact ~1e-5: fp32 is asked for), the same stored features; converted once, then loaded from the cache."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from dogbreed.vision import runtime
from dogbreed.vision.decode import decode, read_bytes
from dogbreed.vision.predictors import BreedPredictor

pytest.importorskip("openvino")
SAMPLES = Path(__file__).resolve().parents[1] / "dogbreed" / "samples"


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def pair(cache):
    mp = pytest.MonkeyPatch()
    mp.setenv("DOGBREED_CACHE", str(cache))
    try:
        torch_ = BreedPredictor("default", runtime="torch", num_threads=1)
        ov = BreedPredictor("default", runtime="openvino", num_threads=1)
    finally:
        mp.undo()
    assert (torch_.runtime, ov.runtime) == ("torch", "openvino")
    return torch_, ov


def _photos(shared: Path | None, n: int = 200) -> list[Path]:
    photos = sorted(p for p in SAMPLES.iterdir() if p.suffix in (".jpg", ".png"))
    if shared is not None:
        more = sorted(p for p in shared.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        random.Random(0).shuffle(more)
        photos += more[:n]
    return photos


def _crops(predictor: BreedPredictor, photos: list[Path]) -> np.ndarray:
    geometry = predictor.spec.preprocessing.geometry()
    return np.stack([decode(read_bytes(str(p), 10**9), geometry).model_input for p in photos])


@pytest.mark.slow  # real processes, several seconds: the full suite (CI) runs it
def test_openvino_gives_torchs_answers_on_real_photos(pair):
    torch_, ov = pair
    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    photos = _photos(shared if shared.is_dir() else None)
    crops = _crops(torch_, photos)
    a_imagenet, a_breeds, a_feats = zip(*(torch_._forward(crops[i:i + 16]) for i in range(0, len(crops), 16)))
    b_imagenet, b_breeds, b_feats = zip(*(ov._forward(crops[i:i + 16]) for i in range(0, len(crops), 16)))
    a_imagenet, b_imagenet = np.concatenate(a_imagenet), np.concatenate(b_imagenet)
    dogs = torch_.dog_indices
    assert (a_imagenet.argmax(1) == b_imagenet.argmax(1)).mean() >= 0.995
    assert np.abs(a_imagenet[:, dogs].sum(1) - b_imagenet[:, dogs].sum(1)).max() <= 0.01
    assert np.abs(np.concatenate(a_breeds) - np.concatenate(b_breeds)).max() <= 0.01
    assert np.abs(np.concatenate(a_feats) - np.concatenate(b_feats)).max() < 1e-3  # the stored embeddings


def test_any_batch_size_runs(pair):
    torch_, ov = pair
    crops = _crops(torch_, _photos(None))
    for n in (1, 5, len(crops)):  # not only the batch size it was converted with
        assert np.allclose(torch_._forward(crops[:n])[0], ov._forward(crops[:n])[0], atol=1e-4)


@pytest.mark.slow  # real processes, several seconds: the full suite (CI) runs it
def test_the_converted_network_is_cached_and_a_damaged_cache_is_rebuilt(pair, cache, monkeypatch):
    monkeypatch.setenv("DOGBREED_CACHE", str(cache))
    entries = list((cache / "openvino").iterdir())
    assert len(entries) == 1 and (entries[0] / "backbone.xml").is_file() and (entries[0] / "backbone.bin").is_file()
    assert not [p for p in (cache / "openvino").iterdir() if p.name.startswith(".")], "no temporary folder stays"

    def no_conversion(*args):
        raise AssertionError("converted again although the cache holds the network")

    with monkeypatch.context() as m:
        m.setattr(runtime, "_convert", no_conversion)
        BreedPredictor("default", runtime="openvino", num_threads=1)  # loads from the cache
    (entries[0] / "backbone.xml").write_text("<garbage")
    again = BreedPredictor("default", runtime="openvino", num_threads=1)
    x = _crops(again, _photos(None)[:2])
    assert np.allclose(again._forward(x)[0], pair[0]._forward(x)[0], atol=1e-4)


def test_runtime_choice():
    assert runtime.resolve("auto", "cuda") == "torch"  # GPUs keep torch
    assert runtime.resolve("torch", "cpu") == "torch"
    assert runtime.resolve("auto", "cpu") == "openvino"
    with pytest.raises(ValueError, match="expected one of"):
        runtime.resolve("tensorrt", "cpu")
