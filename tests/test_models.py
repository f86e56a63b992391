"""The offline default model and model artifacts: safe loading, tamper and mismatch detection."""

import json
import pickle
from pathlib import Path

import pytest
import torch

from dogbreed.vision import models, nets
from dogbreed.vision.models import ModelSpec
from dogbreed.vision.nets import BreedNet, ModelError, create_backbone
from dogbreed.vision.preprocessing import Preprocessing

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def default():
    return models.load_default()


def test_default_model_is_offline_lite0_with_its_preprocessing(default):
    assert default.spec.backbone == "tf_efficientnet_lite0"
    assert default.spec.preprocessing == Preprocessing.for_backbone("tf_efficientnet_lite0")
    assert default.spec.preprocessing.crop_mode == "center"  # timm's whole data config is kept
    assert len(default.spec.class_names) == 119 and default.spec.class_names[0] == "Chihuahua"
    assert default.model_id.startswith("tf_efficientnet_lite0@") and default.model_id == models.describe_model()[1]


def test_one_pass_gives_imagenet_logits_and_features(default):
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        imagenet, breeds = default.net(x)
        assert breeds is None and imagenet.shape == (2, 1000)
        assert torch.allclose(imagenet, default.net.backbone(x), atol=1e-4)  # same as timm's own forward


def _tiny_artifact(tmp_path, num_breeds=3):
    import timm

    net = BreedNet(timm.create_model("test_efficientnet", pretrained=False), num_breeds)
    spec = ModelSpec(backbone="test_efficientnet", class_names=[f"breed {i}" for i in range(num_breeds)],
                     breed_source="head", preprocessing=Preprocessing(input_size=64, crop_pct=1.0),
                     metrics={"top1": 0.5})
    return net, spec, models.save_artifact(net, spec, tmp_path / "m")


def test_artifact_round_trip(tmp_path):
    net, spec, model_id = _tiny_artifact(tmp_path)
    loaded = models.load_artifact(tmp_path / "m")
    assert loaded.model_id == model_id and loaded.spec == spec
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(loaded.net(x)[1], net.eval()(x)[1])
    assert not list((tmp_path / "m").glob("*.tmp"))


def test_tampered_weights_are_refused(tmp_path):
    _tiny_artifact(tmp_path)
    w = tmp_path / "m" / models.WEIGHTS_FILE
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="does not match the hash"):
        models.load_artifact(tmp_path / "m")


def test_edited_class_names_are_refused(tmp_path):
    _tiny_artifact(tmp_path)
    j = tmp_path / "m" / models.SPEC_FILE
    doc = json.loads(j.read_text())
    doc["class_names"][0] = "poodle"
    j.write_text(json.dumps(doc))
    with pytest.raises(ModelError, match="edited after saving"):
        models.load_artifact(tmp_path / "m")


def test_mismatched_head_is_refused(tmp_path):
    net, spec, _ = _tiny_artifact(tmp_path)
    spec.class_names = spec.class_names + ["extra"]
    models.save_artifact(net, spec, tmp_path / "m")  # 4 names, weights for 3 breeds
    with pytest.raises(ModelError, match="do not fit"):
        models.load_artifact(tmp_path / "m")


def test_not_an_artifact(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        models.load_model(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="not a model artifact"):
        models.load_model(tmp_path / "empty")


class _Evil:
    def __reduce__(self):
        return (exec, ("open('/tmp/dogbreed-pwned', 'w').write('x')",))


def test_pickled_code_is_never_executed(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"w": _Evil()}, f)
    with pytest.raises(ModelError, match="cannot read weights"):
        nets.read_weights(path)
    import os
    assert not os.path.exists("/tmp/dogbreed-pwned")


@pytest.mark.parametrize("edit, key", [
    (lambda d: d.pop("model_id"), "model_id"),
    (lambda d: d.update(format_version="1"), "format_version"),
    (lambda d: d["preprocessing"].update(crop_pct=0), "preprocessing"),
    (lambda d: d["preprocessing"].update(input_size=10**9), "preprocessing"),  # was a 3e18-byte allocation
    (lambda d: d["preprocessing"].update(mean=[float("nan")] * 3), "preprocessing"),  # was a traceback
    (lambda d: d["preprocessing"].update(std=[float("inf")] * 3), "preprocessing"),  # was "neither" for every photo
    (lambda d: d.update(breed_source="imagenet2"), "breed_source"),
    (lambda d: d.update(surprise=1), "surprise"),
])
def test_a_bad_model_json_is_one_sentence_naming_the_key(tmp_path, edit, key):
    _edited_artifact_fails(tmp_path, edit, f"key '{key}")


@pytest.mark.parametrize("edit, reason", [
    (lambda d: d.update(imagenet_breed_indices=[5000, 1]), "imagenet_breed_indices holds 5000: ImageNet classes are 0-999"),
    (lambda d: d.update(imagenet_breed_indices=[-1, 1]), "imagenet_breed_indices holds -1"),
    (lambda d: d.update(imagenet_breed_indices=[True, 1]), "key 'imagenet_breed_indices.0': Input should be a valid integer"),
    (lambda d: d.update(breed_source="imagenet"), "breed_source 'imagenet' needs imagenet_breed_indices, one per class name [(]2[)], not none"),
    (lambda d: d.update(breed_source="imagenet", imagenet_breed_indices=[151]), "breed_source 'imagenet' needs imagenet_breed_indices, one per class name [(]2[)], not 1"),
])
def test_breeds_read_from_imagenet_need_one_imagenet_class_each(tmp_path, edit, reason):
    """An index past the ImageNet head was a traceback in every worker; a missing list made every photo an error."""
    _edited_artifact_fails(tmp_path, edit, reason)


def _edited_artifact_fails(folder, edit, reason: str) -> None:
    import json

    from dogbreed.vision.models import load_artifact, save_artifact

    spec = ModelSpec(backbone="test_efficientnet", class_names=["a", "b"], breed_source="head",
                     preprocessing=Preprocessing(input_size=64, crop_pct=1.0))
    save_artifact(BreedNet(create_backbone("test_efficientnet"), 2), spec, folder)
    doc = json.loads((folder / "model.json").read_text())
    edit(doc)
    (folder / "model.json").write_text(json.dumps(doc))
    with pytest.raises(ModelError, match=f"model.json is not a usable dogbreed model description: {reason}") as e:
        load_artifact(folder)
    assert "\n" not in str(e.value)


# ---- zero-shot with any timm ImageNet-1k classifier -----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_timm_file(tmp_path_factory):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("timm") / "tiny.safetensors"
    save_file(create_backbone("test_efficientnet").state_dict(), str(path))
    return path


def test_timm_model_from_a_local_safetensors_file(tiny_timm_file, tmp_path):
    from safetensors.torch import save_file

    from dogbreed.vision.models import describe_model, load_model

    ref = f"timm:test_efficientnet={tiny_timm_file}"
    loaded = load_model(ref)
    spec, model_id = describe_model(ref)
    assert loaded.model_id == model_id and model_id.startswith("test_efficientnet@")
    # Preprocessing comes from timm's pretrained config of that model, not from the default's.
    assert spec.preprocessing == Preprocessing.for_backbone("test_efficientnet") != Preprocessing()
    assert spec.preprocessing.input_size == 160 and spec.breed_source == "imagenet"
    state = create_backbone("test_efficientnet", tiny_timm_file).state_dict()
    for k, v in loaded.net.backbone.state_dict().items():
        torch.testing.assert_close(v, state[k])  # the file's weights, not random ones
    torch.manual_seed(2)
    other = tmp_path / "other.safetensors"
    save_file(create_backbone("test_efficientnet").state_dict(), str(other))
    assert describe_model(f"timm:test_efficientnet={other}")[1] != model_id  # model_id comes from the weights


def test_timm_model_runs_in_the_predictor(tiny_timm_file):
    import numpy as np

    from dogbreed.vision.predictors import BreedPredictor

    p = BreedPredictor(f"timm:test_efficientnet={tiny_timm_file}", top_k=2)
    out = p({"ok": np.array([True]), "status": np.array([None], dtype=object), "face_count": np.array([0]),
             "image": np.zeros((1, 160, 160, 3), np.uint8)})
    assert out["status"][0] in ("dog", "neither") and len(out["breeds"][0]) == 2
    assert out["model_id"][0] == p.model_id


@pytest.mark.parametrize("ref, message", [
    ("timm:no_such_net", "timm has no model named 'no_such_net'"),
    ("timm:test_efficientnet=/nope.safetensors", "is not a .safetensors weights file"),
    ("timm:test_efficientnet", "are not cached and cannot be downloaded"),
])
def test_unusable_timm_reference_is_one_sentence(ref, message, monkeypatch):
    from dogbreed.vision.models import describe_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on a machine with no hub: nothing is fetched
    with pytest.raises(ModelError, match=message) as e:
        describe_model(ref)
    assert "\n" not in str(e.value)


def test_an_unreachable_hub_is_one_sentence_without_the_downloads_retries(monkeypatch):
    """Offline, the download retried for about 30 s and printed each try before the sentence."""
    import socket

    import huggingface_hub
    from huggingface_hub import constants

    from dogbreed.vision.models import describe_model

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _no_download)
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ModelError, match="are not cached and cannot be downloaded [(]ConnectionError[)]") as e:
        describe_model("timm:test_efficientnet")
    assert "\n" not in str(e.value)
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # behind a proxy only the download can tell: it is tried
    with pytest.raises(ModelError, match="[(]AssertionError[)]"):
        describe_model("timm:test_efficientnet")


def _no_download(*args, local_files_only: bool = False, **kwargs):
    if local_files_only:  # the cache is looked at first, and holds nothing here
        raise FileNotFoundError("not cached")
    raise AssertionError("a download was tried although the hub cannot be reached")


def _consistent(folder: Path, **changes) -> None:
    """Rewrite model.json so that its hash and model_id fit whatever model.safetensors now is: a tampered artifact that
    passes the content checks, as someone could make one."""
    import json

    from dogbreed.vision import models as m

    doc = json.loads((folder / "model.json").read_text())
    doc.update(changes)
    spec = m.ModelSpec.model_validate({k: v for k, v in doc.items() if k not in ("weights_sha256", "model_id")})
    sha = m._sha256_file(folder / "model.safetensors")
    doc.update(weights_sha256=sha, model_id=m._model_id(spec, sha))
    (folder / "model.json").write_text(json.dumps(doc))


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    from dogbreed.vision.models import ModelSpec, save_artifact

    folder = tmp_path_factory.mktemp("artifact")
    net = BreedNet(create_backbone("test_efficientnet"), 3)
    save_artifact(net, ModelSpec(backbone="test_efficientnet", class_names=["a", "b", "c"], breed_source="head",
                                 preprocessing=Preprocessing(input_size=64)), folder)
    return folder


def _bad(kind: str, artifact: Path, tmp_path: Path) -> str:
    import shutil

    import torch
    from safetensors.torch import save_file

    folder = tmp_path / kind
    shutil.copytree(artifact, folder)
    if kind == "wrong-shapes":  # 5 breeds' head in a model.json that says 3
        save_file({k: v for k, v in BreedNet(create_backbone("test_efficientnet"), 5).state_dict().items()},
                  str(folder / "model.safetensors"))
        _consistent(folder)
    elif kind == "pickle":  # a torch pickle under the safetensors name
        torch.save({"backbone.x": torch.zeros(1)}, folder / "model.safetensors")
        _consistent(folder)
    elif kind == "path-backbone":
        _consistent(folder, backbone="../../etc/passwd")
    elif kind == "timm-garbage":
        (tmp_path / "garbage.safetensors").write_bytes(b"\x00\x01garbage" * 100)
        return f"timm:test_efficientnet={tmp_path / 'garbage.safetensors'}"
    return str(folder)


@pytest.mark.parametrize("kind, message", [
    ("wrong-shapes", "do not fit test_efficientnet with 3 breeds (breed_head.bias is [5] where"),
    ("pickle", "model.safetensors is not a safetensors weights file"),
    ("path-backbone", "'../../etc/passwd' is not a timm model name"),
    ("timm-garbage", "garbage.safetensors is not a safetensors weights file"),
])
@pytest.mark.slow  # real processes, several seconds: the full suite (CI) runs it
def test_a_bad_model_is_one_sentence_and_exit_2_before_ray_starts(kind, message, artifact, tmp_path):
    """These were found only inside the Ray actor: 276 lines of tracebacks and exit 1."""
    import subprocess
    import sys

    ref = _bad(kind, artifact, tmp_path)
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes((REPO / "dogbreed" / "samples" / "coffee.png").read_bytes())
    proc = subprocess.run([str(Path(sys.executable).with_name("dogbreed")), "scan", str(photos), "--out",
                           str(tmp_path / "out"), "--model", ref], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "Started a local Ray" not in proc.stderr and not (tmp_path / "out").exists()


@pytest.mark.slow  # a real process
def test_a_bad_model_on_an_existing_output_is_refused_before_ray_and_leaves_the_table_as_it_was(artifact, tmp_path,
                                                                                                commit_rows):
    """An incremental run checks the model once its plan has work (so that a nightly run with nothing new loads no
    network library); the check must still come before Ray starts and before anything is committed."""
    import subprocess
    import sys

    from dogbreed.table import readers

    ref = _bad("wrong-shapes", artifact, tmp_path)
    photos, out = tmp_path / "photos", tmp_path / "out"
    photos.mkdir()
    (photos / "a.jpg").write_bytes((REPO / "dogbreed" / "samples" / "coffee.png").read_bytes())
    commit_rows(out, [photos / "a.jpg"], model_id=models.describe_model()[1])
    before = readers.manifests(out)
    proc = subprocess.run([str(Path(sys.executable).with_name("dogbreed")), "scan", str(photos), "--out", str(out),
                           "--model", ref], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "do not fit test_efficientnet with 3 breeds" in lines[0], proc.stderr[-2000:]
    assert "Started a local Ray" not in proc.stderr and readers.manifests(out) == before


# ---- a doctored artifact: one sentence, never a traceback or an empty answer ----------------------------------


@pytest.mark.parametrize("text, reason", [
    ('{"format_version": ' + "9" * 5000 + "}", "it holds a number of thousands of digits"),  # was ValueError
    ('{"format_version": 1, "backbone": ' + "9" * 5000 + "}", "it holds a number of thousands of digits"),
    ("[" * 100000, "it nests lists or objects thousands deep"),  # was RecursionError
])
def test_a_model_json_python_cannot_parse_is_one_sentence(tmp_path, text, reason):
    _tiny_artifact(tmp_path)
    (tmp_path / "m" / "model.json").write_text(text)
    with pytest.raises(ModelError, match=f"model.json is not a usable dogbreed model description: {reason}") as e:
        models.describe_model(tmp_path / "m")
    assert "\n" not in str(e.value)


def test_a_huge_format_version_is_not_printed_whole(tmp_path):
    _tiny_artifact(tmp_path)
    j = tmp_path / "m" / "model.json"
    j.write_text(json.dumps(json.loads(j.read_text()) | {"format_version": 10**4000}))
    with pytest.raises(ModelError, match="written by a newer dogbreed [(]format of a far newer kind[)]") as e:
        models.describe_model(tmp_path / "m")
    assert len(str(e.value)) < 300


def _nested(depth: int) -> list:
    x: list = []
    for _ in range(depth):
        x = [x]
    return x


@pytest.mark.parametrize("edit, reason", [
    (lambda d: d.update(class_names=["a", ""]), "key 'class_names': class name 1 is empty"),
    (lambda d: d.update(class_names=["  ", "b"]), "key 'class_names': class name 0 is empty"),
    (lambda d: d.update(class_names=["a", "b\nerror: fake line"]), "key 'class_names': class name 1 .* holds a control"),
    (lambda d: d.update(class_names=["a\x1b[31m", "b"]), "key 'class_names': class name 0 .* holds a control"),
    (lambda d: d.update(class_names=["a", "b\u2028c"]), "key 'class_names': class name 1 .* line break"),
    (lambda d: d.update(class_names=["Pug", "pug "]), "key 'class_names': one breed is named twice: 'Pug' and 'pug '; a breed"),
    (lambda d: d.update(class_names=["L\u00f6wchen", "Lo\u0308wchen"]), "key 'class_names': one breed is named twice"),
    (lambda d: d.update(class_names=["Shih-Tzu", "Shih_Tzu"]), "key 'class_names': one breed is named twice"),
    (lambda d: d.update(class_names=["Samoyed", "Samoyede"]), "key 'class_names': one breed is named twice: 'Samoyed' and 'Samoyede' [(]both ImageNet's Samoyed[)]"),
    (lambda d: d.update(class_names=["Beagle\u200b", "Pug"]), "key 'class_names': class name 0 .* holds an invisible format"),
    (lambda d: d.update(class_names=["Pug", "\u202eelgaeB"]), "key 'class_names': class name 1 .* holds an invisible format"),
    (lambda d: d["preprocessing"].update(crop_pct=1e-6), "key 'preprocessing': crop_pct 1e-06 keeps almost nothing"),
    (lambda d: d["preprocessing"].update(crop_pct=0.49), "key 'preprocessing': crop_pct 0.49 keeps almost nothing"),
    (lambda d: d.update(training={"x": _nested(900)}), "key 'training': it nests more than 32 levels deep"),
])
def test_unprintable_class_names_and_a_tiny_crop_are_refused(tmp_path, edit, reason):
    """An empty name printed a bare 'dog', a newline a fake line of output; crop_pct 1e-6 resized every photo to a
    224-million-pixel side; 900 levels of notes passed JSON and then broke computing the model_id."""
    _edited_artifact_fails(tmp_path, edit, reason)


def test_names_of_any_script_and_timms_crops_are_accepted(tmp_path):
    _tiny_artifact(tmp_path)
    _consistent(tmp_path / "m", class_names=["Chien de Saint-Hubert é", "柴犬", "Ca de bou"],
                preprocessing=Preprocessing(input_size=64, crop_pct=0.5).__dict__ | {"mean": [0.5] * 3, "std": [0.5] * 3})
    spec, _ = models.describe_model(tmp_path / "m")
    assert spec.class_names[1] == "柴犬" and spec.preprocessing.crop_pct == 0.5


def _doctored_weights(tmp_path: Path, name: str, change) -> Path:
    """The tiny artifact with one tensor changed and its hash and model_id made to fit, as someone could."""
    from safetensors.torch import load_file, save_file

    _tiny_artifact(tmp_path)
    w = tmp_path / "m" / models.WEIGHTS_FILE
    state = load_file(str(w))
    state[name] = change(state[name])
    save_file(state, str(w))
    _consistent(tmp_path / "m")
    return tmp_path / "m"


@pytest.mark.parametrize("name, change, problem", [
    ("breed_head.bias", lambda t: t.fill_(float("nan")), "breed_head.bias holds NaN or infinite values"),
    ("backbone.conv_stem.weight", lambda t: t.fill_(float("inf")), "backbone.conv_stem.weight holds NaN or infinite"),
    ("breed_head.weight", lambda t: t.double().fill_(1e39), "breed_head.weight holds NaN or infinite"),  # past float32
    ("breed_head.weight", lambda t: t.to(torch.int8), "breed_head.weight is stored as int8, where the network needs "
                                                       "float16, bfloat16, float32 or float64 weights"),
    ("backbone.bn1.num_batches_tracked", lambda t: t.double(), "backbone.bn1.num_batches_tracked is stored as float64, "
                                                               "where the network needs integers"),
])
def test_weights_that_cannot_be_used_are_one_sentence_naming_the_tensor(tmp_path, name, change, problem):
    """NaN or infinite weights gave every photo 'neither' with no probabilities, exit 0; int8 weights were converted
    silently into whole numbers. The driver's check (headers and tensors) and the worker's load both refuse them."""
    folder = _doctored_weights(tmp_path, name, change)
    with pytest.raises(ModelError, match=f"the weights in model.safetensors cannot be used [(]{problem}") as e:
        models.check_model(folder)
    assert "\n" not in str(e.value)
    with pytest.raises(ModelError, match=f"the weights in model.safetensors cannot be used [(]{problem}"):
        models.load_artifact(folder)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_are_a_legitimate_artifact(tmp_path, dtype):
    """A checkpoint saved after .half() (as many published ones are) widens exactly to float32: the same model."""
    folder = _doctored_weights(tmp_path, "breed_head.weight", lambda t: t.to(dtype))
    models.check_model(folder)
    loaded = models.load_artifact(folder)
    assert loaded.net.breed_head.weight.dtype == torch.float32


def test_a_non_finite_timm_weights_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    state = create_backbone("test_efficientnet").state_dict()
    state["classifier.bias"] = torch.full_like(state["classifier.bias"], float("nan"))
    save_file(state, str(tmp_path / "nan.safetensors"))
    ref = f"timm:test_efficientnet={tmp_path / 'nan.safetensors'}"
    with pytest.raises(ModelError, match="cannot be used [(]classifier.bias holds NaN or infinite values[)]"):
        models.check_model(ref)
    with pytest.raises(ModelError, match="cannot be used [(]classifier.bias holds NaN or infinite values[)]"):
        models.load_model(ref)


@pytest.mark.parametrize("index", [1000, -2])
def test_a_prototype_heads_imagenet_class_out_of_range_is_refused(tmp_path, index):
    """An index past the ImageNet head was an IndexError traceback in every worker."""
    from safetensors.torch import load_file, save_file

    spec = ModelSpec(backbone="test_efficientnet", class_names=["a", "b"], breed_source="head", head="prototypes",
                     preprocessing=Preprocessing(input_size=64, crop_pct=1.0))
    models.save_artifact(BreedNet(create_backbone("test_efficientnet"), 2, head="prototypes"), spec, tmp_path / "m")
    w = tmp_path / "m" / models.WEIGHTS_FILE
    state = load_file(str(w))
    state["breed_head.imagenet_index"] = torch.tensor([208, index])
    save_file(state, str(w))
    _consistent(tmp_path / "m")
    problem = f"breed_head.imagenet_index holds {index}: a breed's ImageNet class is 0-999, or -1 for none"
    for check in (models.check_model, models.load_artifact):
        with pytest.raises(ModelError, match=f"cannot be used [(]{problem}[)]"):
            check(tmp_path / "m")
