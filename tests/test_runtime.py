"""The backbone in OpenVINO gives torch's answers on real photos: ImageNet top-1 equal on >= 99.5%, dog scores within
0.01 (in fact ~1e-5: fp32 is asked for), the same stored features; converted once, then loaded from the cache."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
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
    assert len(entries) == 1 and all((entries[0] / f).is_file() for f in ("network.xml", "network.bin", "meta.json"))
    assert not [p for p in (cache / "openvino").iterdir() if p.name.startswith(".")], "no temporary folder stays"

    def no_conversion(*args):
        raise AssertionError("converted again although the cache holds the network")

    meta = entries[0] / "meta.json"
    os.utime(meta, (time.time() - 40 * 86400,) * 2)
    with monkeypatch.context() as m:
        m.setattr(runtime, "_convert", no_conversion)
        BreedPredictor("default", runtime="openvino", num_threads=1)  # loads from the cache
    assert time.time() - meta.stat().st_mtime < 600, "a load marks the entry used, which keeps it from prune()"
    (entries[0] / "network.xml").write_text("<garbage")
    again = BreedPredictor("default", runtime="openvino", num_threads=1)
    x = _crops(again, _photos(None)[:2])
    assert np.allclose(again._forward(x)[0], pair[0]._forward(x)[0], atol=1e-4)


def test_a_cpu_actor_with_the_model_id_runs_the_cached_network_without_torch(pair, cache):
    """What the scan's CPU actors do: given the driver's description of the model, load the cached conversion alone. A
    real process, so that what it imported can be seen: neither torch nor timm (about 4 s of CPU per actor)."""
    torch_, ov = pair
    crops = _crops(torch_, _photos(None))
    np.save(cache / "crops.npy", crops)
    code = (
        "import sys, numpy as np\n"
        "from dogbreed.vision.predictors import BreedPredictor\n"
        "from dogbreed.vision.spec import ModelSpec\n"
        f"spec = ModelSpec.model_validate_json({ov.spec.model_dump_json()!r})\n"
        f"p = BreedPredictor('default', device='cpu', num_threads=1, described=(spec, {ov.model_id!r}))\n"
        f"out = p._forward(np.load({str(cache / 'crops.npy')!r}))\n"
        f"np.save({str(cache / 'out.npy')!r}, np.concatenate([out[0], out[1]], 1))\n"
        "print(p.runtime, p.model_id, p.embedding_id, 'torch' in sys.modules, 'timm' in sys.modules)\n")
    env = {**os.environ, "DOGBREED_CACHE": str(cache)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["openvino", ov.model_id, ov.embedding_id, "False", "False"]
    imagenet, breeds, _ = torch_._forward(crops)
    assert np.allclose(np.load(cache / "out.npy"), np.concatenate([imagenet, breeds], 1), atol=1e-4)


@pytest.mark.slow  # several seconds; the inner loop stays under 150 s, the full suite (CI) runs it
def test_models_that_share_an_id_but_not_a_description_do_not_share_a_conversion(pair, tmp_path, monkeypatch):
    """The zero-shot restriction of the default model to a taxonomy keeps the default's id; its breed list differs,
    and so does what is converted (the breed probabilities are part of the network)."""
    from dogbreed.evaluation.taxonomy import zero_shot_model

    monkeypatch.setenv("DOGBREED_CACHE", str(tmp_path))  # its own cache: the other tests count entries in theirs
    torch_, ov = pair
    old = tmp_path / "openvino" / "an-older-openvino-s-entry"  # unused for 40 days: a new conversion removes it
    old.mkdir(parents=True)
    (old / "meta.json").write_text("{}")
    os.utime(old / "meta.json", (time.time() - 40 * 86400,) * 2)
    BreedPredictor("default", num_threads=1)  # the default's conversion, cached first
    assert not old.exists()
    zs = BreedPredictor(zero_shot_model(["Beagle", "Pug", "Golden retriever"]), num_threads=1)
    assert zs.runtime == "openvino" and len(zs.spec.class_names) == 3
    crops = _crops(torch_, _photos(None))
    breeds = zs._forward(crops)[1]
    assert breeds.shape == (len(crops), 3) and np.allclose(breeds.sum(1), 1, atol=1e-4)
    assert ov._forward(crops)[1].shape[1] == len(ov.spec.class_names) > 3
    assert len(list((tmp_path / "openvino").iterdir())) == 2


def test_prune_removes_only_its_own_unused_entries_and_killed_conversions(tmp_path):
    now = time.time()

    def folder(name: str, age_s: float, meta: bool = True) -> Path:
        path = tmp_path / name
        path.mkdir()
        if meta:
            (path / "meta.json").write_text("{}")
        os.utime(path / "meta.json" if meta else path, (now - age_s,) * 2)
        return path

    day = 86400
    unused = folder("model-a-ov2024.6.0-u8", 31 * day)
    older_layout = folder("model-a-ov2026.4.1", 90 * day)
    used = folder("model-b-ov2026.4.1-u8", 29 * day)
    killed = folder("." + used.name + "." + "ab" * 16, 2 * 3600, meta=False)
    converting = folder("." + used.name + "." + "cd" * 16, 60, meta=False)
    foreign = folder("not-ours", 400 * day, meta=False)  # no meta.json: not an entry, left alone
    (tmp_path / "notes.txt").write_text("kept")
    assert sorted(runtime.prune(tmp_path, now)) == sorted([unused.name, older_layout.name, killed.name])
    assert used.is_dir() and converting.is_dir() and foreign.is_dir() and (tmp_path / "notes.txt").is_file()
    assert runtime.prune(tmp_path / "absent", now) == []


def test_runtime_choice():
    assert runtime.resolve("auto", "cuda") == "torch"  # GPUs keep torch
    assert runtime.resolve("torch", "cpu") == "torch"
    assert runtime.resolve("auto", "cpu") == "openvino"
    with pytest.raises(ValueError, match="expected one of"):
        runtime.resolve("tensorrt", "cpu")
