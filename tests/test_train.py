"""Tests of the fine-tuning job: loop functions on plain tensors, data splits, and real Ray Train runs on tiny data.

Ray runs use conftest's module-scoped `ray_local` (a private local Ray with 2 CPUs).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from torch import nn
from typer.testing import CliRunner

from dogbreed.cli import app
from dogbreed.config import ConfigError, PhotoConfig
from dogbreed.train import data as train_data
from dogbreed.train import driver, loop, worker
from dogbreed.train.config import TrainConfig, load_train_config
from dogbreed.vision.models import load_artifact, save_artifact
from dogbreed.vision.nets import BreedNet, ModelError, create_backbone
from dogbreed.vision.preprocessing import Preprocessing

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "train.yaml"
TINY = "test_efficientnet"  # builds offline with random weights; its ImageNet head is random, fine here
CLASSES = ("001.Red_circle", "002.Green_square", "003.Blue_triangle")


def _draw(shape: int, rng: np.random.Generator) -> Image.Image:
    img = Image.new("RGB", (64, 64), tuple(int(v) for v in rng.integers(0, 60, 3)))
    draw = ImageDraw.Draw(img)
    x, y = (int(v) for v in rng.integers(4, 24, 2))
    s = int(rng.integers(20, 36))
    colour = [(220, 40, 40), (40, 200, 60), (50, 70, 230)][shape]
    if shape == 0:
        draw.ellipse([x, y, x + s, y + s], fill=colour)
    elif shape == 1:
        draw.rectangle([x, y, x + s, y + s], fill=colour)
    else:
        draw.polygon([(x, y + s), (x + s, y + s), (x + s // 2, y)], fill=colour)
    return img


def make_folders(root: Path, n: int = 12, classes=CLASSES, seed: int = 0) -> Path:
    """3 classes x n coloured-shape photos in class-per-folder layout."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            _draw(c, rng).save(root / name / f"{i:03d}.jpg")
    return root


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_folders(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    """Fixed random weights for the tiny backbone, so a test can tell what changed."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_file(create_backbone(TINY).state_dict(), str(path))
    return path


# ---- loop functions on plain tensors ------------------------------------------------------------------------


def test_train_one_epoch_lowers_loss_on_a_learnable_problem():
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 256, 32)]
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    optimizer, scheduler = loop.make_optimizer([{"params": model.parameters(), "lr": 0.05}], 0.0, 5 * len(batches))
    before = loop.eval_one_epoch(model, batches, nn.CrossEntropyLoss())
    for _ in range(5):
        stats = loop.train_one_epoch(model, batches, nn.CrossEntropyLoss(), optimizer, scheduler)
    after = loop.eval_one_epoch(model, batches, nn.CrossEntropyLoss())
    assert stats.n == 256
    assert after.loss < 0.6 * before.loss
    assert after.acc > 0.85


def test_discriminative_lrs_decrease_and_imagenet_head_stays_frozen():
    net = BreedNet(create_backbone(TINY), 3)
    loop.set_trainable(net, 3)
    groups = loop.param_groups(net, 3, lr=1e-3, lr_decay=0.5)
    assert [g["name"] for g in groups] == ["breed_head", "backbone_top1", "backbone_top2", "backbone_top3"]
    assert [g["lr"] for g in groups] == pytest.approx([1e-3, 5e-4, 2.5e-4, 1.25e-4])
    in_groups = {id(p) for g in groups for p in g["params"]}
    trainable = {id(p) for p in net.parameters() if p.requires_grad}
    assert in_groups == trainable
    assert not any(p.requires_grad for p in net.backbone.get_classifier().parameters())
    assert not any(p.requires_grad for p in net.backbone.conv_stem.parameters())


def test_freeze_trains_only_the_breed_head():
    net = BreedNet(create_backbone(TINY), 3)
    loop.set_trainable(net, 0)
    assert {n for n, p in net.named_parameters() if p.requires_grad} == {"breed_head.weight", "breed_head.bias"}
    loop.set_train_mode(loop.BreedLogits(net))
    assert net.breed_head.training and not net.backbone.bn1.training  # frozen BatchNorm keeps its statistics


def test_one_cycle_schedule_warms_up_then_decays():
    params = [nn.Parameter(torch.zeros(1))]
    optimizer, scheduler = loop.make_optimizer([{"params": params, "lr": 0.1}], 0.0, total_steps=20)
    lrs = []
    for _ in range(20):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step() if scheduler.last_epoch + 1 < 20 else None
    peak = int(np.argmax(lrs))
    assert 0 < peak < 19 and lrs[peak] == pytest.approx(0.1, rel=0.05)
    assert all(a <= b for a, b in zip(lrs[:peak], lrs[1:peak + 1]))
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:]))
    assert lrs[-1] < lrs[0] < lrs[peak]


def test_stages_per_mode():
    base = {"data": "d", "out": "o", "epochs": 5, "head_epochs": 2, "unfreeze_blocks": 2, "lr": 1e-3}
    freeze = worker.stages(load_train_config(str(CONFIG), base | {"mode": "freeze"}))
    assert [(s.name, s.epochs, s.unfreeze, s.from_features) for s in freeze] == [("head", 5, 0, True)]
    finetune = worker.stages(load_train_config(str(CONFIG), base | {"mode": "finetune", "cache_features": True}))
    assert [(s.name, s.epochs, s.unfreeze, s.from_features) for s in finetune] == [("finetune", 5, 2, False)]
    two = worker.stages(load_train_config(str(CONFIG), base | {"mode": "two-stage", "finetune_lr": 1e-4}))
    assert [(s.name, s.epochs, s.unfreeze, s.lr) for s in two] == [("head", 2, 0, 1e-3), ("finetune", 5, 2, 1e-4)]
    assert load_train_config(str(CONFIG), base | {"mode": "two-stage"}).total_epochs == 7


# ---- data --------------------------------------------------------------------------------------------------


def test_stratified_split_is_seeded_balanced_and_disjoint():
    items = [(f"p{c}_{i}", c) for c in range(3) for i in range(20)]
    a = train_data.stratified_split(items, (0.8, 0.1, 0.1), seed=1)
    assert a == train_data.stratified_split(items, (0.8, 0.1, 0.1), seed=1)
    assert a != train_data.stratified_split(items, (0.8, 0.1, 0.1), seed=2)
    assert [len(p) for p in a] == [48, 6, 6]
    assert all(sum(1 for _, y in part if y == c) == len(part) // 3 for part in a for c in range(3))
    assert sorted(sum(a, [])) == sorted(items)


def test_splits_for_each_folder_layout(tmp_path):
    plain = make_folders(tmp_path / "plain", n=10, classes=("Golden_retriever", "Beagle"))
    s = train_data.make_splits(str(plain))
    assert s.class_names == ["Beagle", "Golden retriever"]
    assert (len(s.train), len(s.val), len(s.test)) == (16, 2, 2)

    make_folders(tmp_path / "stanford" / "Images", n=4, classes=("n02085620-Chihuahua", "n02085782-Japanese_spaniel"))
    assert train_data.make_splits(str(tmp_path / "stanford")).class_names == ["Chihuahua", "Japanese spaniel"]

    for split in ("train", "valid", "test"):
        make_folders(tmp_path / "dogImages" / split, n=3, classes=("001.Affenpinscher", "002.Afghan_hound"))
    s = train_data.make_splits(str(tmp_path / "dogImages"))
    assert s.class_names == ["Affenpinscher", "Afghan hound"]
    assert (len(s.train), len(s.val), len(s.test)) == (6, 6, 6)
    assert all("/valid/" in p for p, _ in s.val)

    plain_val = make_folders(tmp_path / "plain_val", n=2, classes=("Golden_retriever", "Beagle"), seed=1)
    s2 = train_data.make_splits(str(plain), val_data=str(plain_val))
    assert (len(s2.train), len(s2.val), len(s2.test)) == (18, 4, 2)  # only the test part is carved out
    assert s2.fingerprint != train_data.make_splits(str(plain)).fingerprint


def test_val_folder_with_an_unknown_breed_is_refused(tmp_path):
    make_folders(tmp_path / "train", n=3, classes=("A", "B"))
    make_folders(tmp_path / "val", n=3, classes=("A", "C"))
    with pytest.raises(train_data.DataError, match="C"):
        train_data.make_splits(str(tmp_path / "train"), val_data=str(tmp_path / "val"))


def test_fingerprint_changes_with_the_photos(tmp_path):
    root = make_folders(tmp_path / "d", n=3)
    before = train_data.fingerprint({"data": root})
    assert before == train_data.fingerprint({"data": root})
    (root / CLASSES[0] / "000.jpg").unlink()
    assert train_data.fingerprint({"data": root}) != before


def test_decode_batch_is_the_scans_crop_augments_and_leaves_out_bad_photos_with_a_reason(shapes, tmp_path, monkeypatch):
    from dogbreed.vision.decode import decode

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    good = shapes / CLASSES[0] / "000.jpg"
    paths = np.array([str(good), str(bad), str(shapes / CLASSES[1] / "000.jpg")])
    prep, guards = Preprocessing(input_size=48), PhotoConfig()
    warned = []  # recorded directly: Ray may have reconfigured logging earlier in the session
    monkeypatch.setattr(train_data.log, "warning", lambda msg, *args: warned.append(msg % args))
    out = train_data.decode_batch({"path": paths, "label": np.array([0, 0, 1])}, prep, False, guards)
    assert out["x"].shape == (2, 48, 48, 3) and out["x"].dtype == np.uint8
    assert out["label"].tolist() == [0, 1]
    assert warned == [f"training photo {bad} left out: not a recognised image format"]
    # The evaluation crop is exactly the crop the scan feeds the network.
    assert np.array_equal(out["x"][0], decode(good.read_bytes(), prep.geometry()).model_input)
    one = {"path": paths[:1], "label": np.array([0])}
    aug = [train_data.decode_batch(one, prep, True, guards)["x"] for _ in range(3)]
    assert aug[0].shape == (1, 48, 48, 3)
    assert not all(np.array_equal(aug[0], a) for a in aug[1:])  # training photos are augmented


def test_on_a_12_mp_jpeg_trainings_validation_crop_is_the_scans_crop_byte_for_byte(tmp_path):
    """Both decode through the one photo worker with the scan's geometry: the same DCT scale, the same crop.

    (Training once decoded with the model's short side only: from a 4000x3000 JPEG that is a 1/8 draft where the scan
    decodes at 1/4, and 90% of the crop's values differed.)"""
    from dogbreed.config import ScanConfig
    from dogbreed.vision.predictors import Decoder

    big = tmp_path / "Labrador" / "12mp.jpg"
    big.parent.mkdir()
    Image.open(REPO / "dogbreed" / "samples" / "Labrador_retriever_06449.jpg").convert("RGB").resize(
        (4000, 3000), Image.Resampling.BICUBIC).save(big, quality=92)
    prep = Preprocessing.for_backbone("tf_efficientnet_lite0")
    val = train_data.decode_batch({"path": np.array([str(big)]), "label": np.array([0])}, prep, False,
                                  TrainConfig().photos)["x"][0]
    scan = ScanConfig()
    decoder = Decoder(prep, scan.face, scan.photos)
    try:
        crop = decoder({"path": np.array([str(big)], dtype=object)})["image"][0]
    finally:
        decoder.close()
    assert val.shape == crop.shape == (224, 224, 3)
    assert val.tobytes() == crop.tobytes()


def test_transparency_is_white_in_training_as_in_the_scan(tmp_path):
    path = tmp_path / "clear.png"
    Image.new("RGBA", (64, 64), (0, 0, 0, 0)).save(path)
    out = train_data.decode_batch({"path": np.array([str(path)]), "label": np.array([0])},
                                  Preprocessing(input_size=32), False, PhotoConfig())
    assert out["x"].min() == 255


def test_config_rejects_unknown_keys_and_bad_modes(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'epoch'"):
        load_train_config(str(CONFIG), {"data": "d", "out": "o", "epoch": 3})
    with pytest.raises(ConfigError, match="mode"):
        load_train_config(str(CONFIG), {"data": "d", "out": "o", "mode": "partial"})
    with pytest.raises(ConfigError, match="'out' must be set"):
        load_train_config(str(CONFIG), {"data": "d"})


def test_train_refuses_an_out_folder_it_did_not_write_and_overwrites_nothing_there(tmp_path):
    """`train --out` over a folder holding another model.json overwrote it (and the weights beside it)."""
    data = tmp_path / "photos"
    (data / "a").mkdir(parents=True)
    foreign = tmp_path / "theirs"
    foreign.mkdir()
    (foreign / "model.json").write_text('{"theirs": true}')
    cases = [(foreign, "already holds 'model.json', which dogbreed training did not write"),
             (data, "lies inside the training photos"), (data / "a" / "model", "lies inside the training photos"),
             (foreign / "model.json", "is a file")]
    for out, reason in cases:
        cfg = load_train_config(str(CONFIG), {"data": str(data), "out": str(out), "backbone": TINY})
        with pytest.raises(ConfigError, match=reason):
            driver.fit(cfg)
    assert sorted(os.listdir(foreign)) == ["model.json"] and (foreign / "model.json").read_text() == '{"theirs": true}'
    assert not (data / "a" / "model").exists() and sorted(os.listdir(data)) == ["a"]
    harmless = tmp_path / "mount"  # what a file system or a desktop puts in any folder does not make it foreign
    (harmless / "lost+found").mkdir(parents=True)
    (harmless / ".DS_Store").write_bytes(b"\0")
    driver._check_out(load_train_config(str(CONFIG), {"data": str(data), "out": str(harmless)}), harmless.resolve())
    ours = tmp_path / "ours"  # a folder an earlier training wrote (a killed run, or a retrain) is its own
    ours.mkdir()
    (ours / driver.CONFIG_FILE).write_text("data: x\n")
    (ours / "model.json").write_text("{}")
    driver._check_out(load_train_config(str(CONFIG), {"data": str(data), "out": str(ours)}), ours.resolve())


# ---- artifacts ---------------------------------------------------------------------------------------------


def _tiny_spec():
    from dogbreed.vision.models import ModelSpec

    return ModelSpec(backbone=TINY, class_names=["A", "B", "C"], breed_source="head",
                     preprocessing=Preprocessing(input_size=64), training={"mode": "freeze"})


def test_artifact_round_trip(tmp_path):
    net = BreedNet(create_backbone(TINY), 3).eval()
    model_id = save_artifact(net, _tiny_spec(), tmp_path)
    loaded = load_artifact(tmp_path)
    assert loaded.model_id == model_id and loaded.spec.breed_source == "head"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(net(x), loaded.net(x)):
            torch.testing.assert_close(a, b)


def test_tampered_artifact_fails_to_load(tmp_path):
    save_artifact(BreedNet(create_backbone(TINY), 3), _tiny_spec(), tmp_path)
    weights = tmp_path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="does not match the hash"):
        load_artifact(tmp_path)


# ---- through Ray Train -------------------------------------------------------------------------------------


@pytest.mark.slow  # a Ray Train fit
def test_two_stage_run_through_ray_train_writes_a_usable_artifact(ray_local, shapes, tiny_weights, tmp_path,
                                                                  shrunk_config):
    test_folder = make_folders(tmp_path / "test", n=4, seed=7)
    cfg = shrunk_config("train", data=shapes, out=tmp_path / "model", weights=tiny_weights, test_data=test_folder,
                        mode="two-stage", head_epochs=1, unfreeze_blocks=1)
    result = driver.fit(cfg)

    loaded = load_artifact(result.artifact_dir)
    assert loaded.model_id == result.model_id
    assert loaded.spec.breed_source == "head"
    assert loaded.spec.class_names == ["Red circle", "Green square", "Blue triangle"]
    assert loaded.spec.preprocessing.input_size == 64
    assert loaded.spec.training["mode"] == "two-stage" and loaded.spec.training["epochs"] == 2
    assert len(loaded.spec.training["data_fingerprint"]) == 64
    assert 0.0 <= result.metrics["test_top1"] <= result.metrics["test_top5"] == 1.0  # 3 breeds: top-5 is all

    fresh = create_backbone(TINY, tiny_weights).state_dict()
    last_ckpt = max(_checkpoints(result.artifact_dir))
    last = torch.load(last_ckpt / worker.STATE_FILE, weights_only=True)["model"]  # the weights after the last epoch
    for trained in (loaded.net.backbone.state_dict(), {k[len("backbone."):]: v for k, v in last.items()}):
        for name in ("classifier.weight", "classifier.bias", "conv_stem.weight", "blocks.0.0.conv.weight",
                     "bn1.running_mean"):
            torch.testing.assert_close(trained[name], fresh[name])  # the dog detector and lower layers are untouched
    assert not torch.equal(last["backbone.conv_head.weight"], fresh["conv_head.weight"])  # the top group trained

    out = result.artifact_dir
    history = (out / "history.csv").read_text().splitlines()
    assert history[0].startswith("epoch,stage,train_loss")
    assert [r.split(",")[1] for r in history[1:]] == ["head", "finetune"]
    for name in ("curves.png", "test/confusion.png", "test/confusion.csv", "test/per_breed.csv", "train_config.yaml"):
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "test" / "metrics.json").read_text())["n"] == 12

    # The stored test accuracy is what `dogbreed evaluate --model` measures on the same folder: one pipeline.
    r = CliRunner().invoke(app, ["evaluate", str(test_folder), "--model", str(out), "--json"])
    assert r.exit_code == 0, r.output
    figures = json.loads(r.output)
    assert figures["dog_photos"] == 12
    assert figures["breed_top1"] == loaded.spec.metrics["test_top1"]
    assert figures["breed_top5"] == loaded.spec.metrics["test_top5"] == 1.0


def test_changed_setup_refuses_to_resume(tmp_path, shapes, tiny_weights, shrunk_config):
    cfg = shrunk_config("train", data=shapes, out=tmp_path / "model", weights=tiny_weights)
    splits = train_data.make_splits(str(shapes))
    driver._check_resume(cfg, tmp_path / "model", splits)
    (tmp_path / "model" / cfg.run_name).mkdir()
    driver._check_resume(cfg.model_copy(update={"num_workers": 2}), tmp_path / "model", splits)  # resources may change
    with pytest.raises(ConfigError, match="lr"):
        driver._check_resume(cfg.model_copy(update={"lr": 0.5}), tmp_path / "model", splits)


def _checkpoints(out: Path) -> list[Path]:
    return [p for p in (out / "run").glob("checkpoint_*") if p.is_dir()]


def _job(config: Path, shapes: Path, out: Path) -> list[str]:
    return [sys.executable, str(REPO / "jobs" / "train.py"), "--config", str(config), str(shapes), "--out", str(out)]


@pytest.mark.slow
def test_killed_run_resumes_from_its_last_checkpoint(shapes, tiny_weights, tmp_path, shrunk_yaml):
    out = tmp_path / "model"
    config = shrunk_yaml("train", weights=tiny_weights, epochs=4, patience=10, cache_features=False)
    first = subprocess.Popen(_job(config, shapes, out), cwd=REPO, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not _checkpoints(out) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(1.0)  # let the snapshot naming the checkpoint land
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the driver and the Ray processes it started: a crashed node
        first.wait()
    assert not (out / "model.json").exists(), "the first run finished before it could be killed"

    second = subprocess.run(_job(config, shapes, out), cwd=REPO, capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stderr[-3000:]
    training = load_artifact(out).spec.training
    assert training["resumed_at_epochs"] and training["resumed_at_epochs"][0] >= 1
    assert [int(r.split(",")[0]) for r in (out / "history.csv").read_text().splitlines()[1:]] == [1, 2, 3, 4]


# ---- refusals before Ray starts ------------------------------------------------------------------------------


def test_resume_refuses_checkpoints_of_other_classes_or_other_photos(tmp_path, tiny_weights, shrunk_config):
    """A class folder added between runs crashed the resumed workers (size mismatch for breed_head.weight); changed
    photos resumed silently on weights that had seen what the new seeded split may now call test photos."""
    data = make_folders(tmp_path / "d", n=4)
    out = tmp_path / "model"
    cfg = shrunk_config("train", data=data, out=out, weights=tiny_weights)
    driver._check_resume(cfg, out, train_data.make_splits(str(data)))
    (out / cfg.run_name).mkdir()
    driver._check_resume(cfg, out, train_data.make_splits(str(data)))  # same classes, same photos: resumes
    make_folders(tmp_path / "more", n=3, classes=("004.Papillon",))
    (tmp_path / "more" / "004.Papillon").rename(data / "004.Papillon")
    with pytest.raises(ConfigError, match=r"other classes \(added Papillon\)"):
        driver._check_resume(cfg, out, train_data.make_splits(str(data)))
    for p in (data / "004.Papillon").iterdir():
        p.unlink()
    (data / "004.Papillon").rmdir()
    (data / CLASSES[0] / "000.jpg").unlink()
    with pytest.raises(ConfigError, match="other photos"):
        driver._check_resume(cfg, out, train_data.make_splits(str(data)))


def test_resume_takes_the_same_photos_under_another_name(tmp_path, tiny_weights, shrunk_config, monkeypatch):
    """Resume compared the photo folder as a plain string: `data2` against `/abs/data2` (or a moved folder holding the
    same photos) was refused as "a run with different data". What the folder holds is compared instead."""
    data = make_folders(tmp_path / "d", n=4)
    out = tmp_path / "model"
    cfg = shrunk_config("train", data=data, out=out, weights=tiny_weights)
    driver._check_resume(cfg, out, train_data.make_splits(str(data)))
    (out / cfg.run_name).mkdir()
    monkeypatch.chdir(tmp_path)
    relative = cfg.model_copy(update={"data": "d", "out": "model"})
    driver._check_resume(relative, out, train_data.make_splits("d"))  # the same folder, named relatively: resumes
    data.rename(tmp_path / "moved")
    driver._check_resume(cfg.model_copy(update={"data": str(tmp_path / "moved")}), out,
                         train_data.make_splits(str(tmp_path / "moved")))  # moved, same photos: resumes
    with pytest.raises(ConfigError, match="different lr"):  # what the run does still counts
        driver._check_resume(relative.model_copy(update={"lr": 0.5}), out, train_data.make_splits(str(tmp_path / "moved")))


def test_a_humans_or_other_folder_in_the_training_tree_is_left_out_not_learnt_as_a_breed(tmp_path, caplog):
    """A dog-app tree with humans/ beside the breeds trained a "humans" class, which the scan then gave as a breed."""
    data = make_folders(tmp_path / "d", n=4)
    make_folders(tmp_path / "d", n=3, classes=("humans", "Other"))
    make_folders(tmp_path / "v", n=2, classes=(CLASSES[0], "people"))
    with caplog.at_level("WARNING", logger="dogbreed.breeds"):
        splits = train_data.make_splits(str(data), val_data=str(tmp_path / "v"))
    assert splits.class_folders == list(CLASSES)
    assert all(os.path.basename(os.path.dirname(p)) in CLASSES for p, _ in splits.train + splits.val + splits.test)
    assert "Other/, humans/ left out" in caplog.text and "people/ left out" in caplog.text
    make_folders(tmp_path / "one", n=3, classes=(CLASSES[0], "humans"))
    with pytest.raises(train_data.DataError, match="at least two class folders"):  # humans/ does not make it two
        train_data.make_splits(str(tmp_path / "one"))


def test_val_and_test_must_be_labelled_and_apart_from_the_training_photos(tmp_path):
    data = make_folders(tmp_path / "d", n=4)
    other = make_folders(tmp_path / "other", n=2, seed=1)
    for val, test, reason in [(data, None, "validation photos .* share 12 photos with the training photos"),
                              (other, data, "test photos .* share 12 photos with the training photos"),
                              (other, other, "test photos .* share 6 photos with the validation photos"),
                              (data / CLASSES[0], None, "validation folder .* holds no photos in class folders")]:
        with pytest.raises(train_data.DataError, match=reason):
            train_data.make_splits(str(data), str(val), test and str(test))
    (tmp_path / "link").symlink_to(data)  # the same photos by another path
    with pytest.raises(train_data.DataError, match="share 12 photos"):
        train_data.make_splits(str(data), str(tmp_path / "link"))
    s = train_data.make_splits(str(data), str(other))
    assert (len(s.train), len(s.val), len(s.test)) == (12, 6, 0)  # 10% of 4 photos a class carves no test photo


def test_cli_refuses_overlapping_splits_in_one_sentence(tmp_path):
    data = make_folders(tmp_path / "d", n=4)
    r = CliRunner().invoke(app, ["train", str(data), "--val", str(data), "--test", str(data), "--out",
                                 str(tmp_path / "m"), "--mode", "freeze", "--epochs", "1"])
    assert r.exit_code == 2, r.output
    assert "share 12 photos" in r.output and "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "m").exists()


def test_max_failures_is_bounded():
    for bad in (-1, 1000):
        with pytest.raises(ConfigError, match="max_failures"):
            load_train_config(str(CONFIG), {"data": "d", "out": "o", "max_failures": bad})
    assert load_train_config(str(CONFIG), {"data": "d", "out": "o", "max_failures": 0}).max_failures == 0


def test_no_test_photos_gives_no_test_metrics_and_a_note(tmp_path, caplog):
    cfg = load_train_config(str(CONFIG), {"data": "d", "out": "o"})
    with caplog.at_level("WARNING"):
        assert driver._test_metrics(tmp_path, [], cfg) == {}
    assert "no test photos (10% of each class rounds to none)" in caplog.text and "%%" not in caplog.text


@pytest.mark.slow
def test_training_with_a_val_folder_and_no_test_photos_completes_without_test_metrics(ray_local, tiny_weights, tmp_path,
                                                                                      shrunk_yaml):
    """--val without --test leaves the test split empty; evaluation of no photos ended the run with KeyError."""
    data = make_folders(tmp_path / "d", n=4)
    val = make_folders(tmp_path / "v", n=2, seed=1)
    config = shrunk_yaml("train", weights=tiny_weights, epochs=1, mode="freeze")
    r = CliRunner().invoke(app, ["train", str(data), "--val", str(val), "--config", str(config), "--out",
                                 str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    metrics = load_artifact(tmp_path / "m").spec.metrics
    assert "test_top1" not in metrics and "val_top1" in metrics


def test_too_few_photos_for_a_validation_split_is_refused_before_ray(tmp_path):
    data = make_folders(tmp_path / "d", n=1, classes=CLASSES[:2])  # 10% of 1 photo a class rounds to none
    cfg = load_train_config(str(CONFIG), {"data": str(data), "out": str(tmp_path / "m"), "backbone": TINY})
    with pytest.raises(ConfigError, match="no validation photos"):
        driver.fit(cfg)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("name", ["Golden\nretriever", "Beagle\x1b[2J", "   ", "poodle"])
def test_a_class_folder_no_model_could_name_is_refused_before_training(tmp_path, name):
    """The model's spec refuses such a class name: it did so after a whole training, as a traceback."""
    from dogbreed.breeds.folders import DataError

    for folder in ("Poodle", name):
        (tmp_path / "data" / folder).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8)).save(tmp_path / "data" / folder / f"{i}.jpg")
    with pytest.raises(DataError, match=r"holds a control character or line break|is empty|one breed is named twice: 'Poodle' and 'poodle'"):
        train_data.make_splits(str(tmp_path / "data"))
    r = CliRunner().invoke(app, ["train", str(tmp_path / "data"), "--out", str(tmp_path / "m"), "--mode", "fewshot"])
    assert r.exit_code == 2 and r.output.startswith(f"error: {tmp_path / 'data'}: "), r.output
    assert not (tmp_path / "m").exists()


# ---- what a private local Ray cannot hold, photos that fail to decode, SIGTERM ------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(180, method="thread")  # the old code waited for ever, deaf to SIGALRM inside ray.get
def test_a_request_this_machines_ray_cannot_hold_is_refused_before_any_work(ray_local, tiny_weights, tmp_path,
                                                                            shrunk_config, shrunk_yaml):
    """`train --workers 4` on 2 CPUs, or `--gpu` without a GPU, waited for ever after computing the features."""
    import ray

    from dogbreed.errors import Refused

    data = make_folders(tmp_path / "d", n=10, classes=CLASSES[:2])
    config = shrunk_yaml("train", weights=tiny_weights, mode="freeze")
    r = CliRunner().invoke(app, ["train", str(data), "--config", str(config), "--out", str(tmp_path / "m"),
                                 "--workers", "4"])
    assert r.exit_code == 4, r.output
    assert r.output.strip() == ("refused: 4 Ray Train worker(s) at cpus_per_worker 1 need 4 CPUs, but this machine's "
                                "Ray has 2: lower --workers or cpus_per_worker")
    assert not (tmp_path / "m").exists()
    # Training on photos decodes them while the workers hold their CPUs: 2 workers on 2 CPUs waited for ever too.
    with pytest.raises(Refused, match=r"2 Ray Train worker\(s\) at cpus_per_worker 1 and a decode task at "
                                      r"decode.num_cpus 0.75 need 2.75 CPUs, but this machine's Ray has 2"):
        driver.fit(shrunk_config("train", data=data, out=tmp_path / "m", weights=tiny_weights, mode="freeze",
                                 cache_features=False, num_workers=2))
    assert not (tmp_path / "m").exists()
    if not ray.cluster_resources().get("GPU"):
        for mode, who in (("freeze", "Ray Train worker and feature actor"), ("fewshot", "feature actor")):
            cfg = shrunk_config("train", data=data, out=tmp_path / mode, weights=tiny_weights, mode=mode, use_gpu=True)
            with pytest.raises(Refused, match=f"--gpu asks for 1 GPU \\(one per {who}\\) but this machine's Ray has 0"):
                driver.fit(cfg)
            assert not (tmp_path / mode).exists()
    # A cluster joined by address may autoscale: there Ray waits, as it does for the scan.
    driver._check_resources(shrunk_config("train", data=data, out=tmp_path / "j", num_workers=4, use_gpu=True,
                                          address="10.0.0.1:6379"))


def _with_undecodable_class(root: Path) -> Path:
    """Two classes of 3 good photos, and Blue triangle (no ImageNet class) whose 2 photos are not photos."""
    make_folders(root, n=3, classes=CLASSES[:2])
    (root / CLASSES[2]).mkdir()
    for name in ("a1.jpg", "a2.jpg"):
        (root / CLASSES[2] / name).write_bytes(b"notaphoto")
    return root


@pytest.mark.slow
def test_a_class_whose_photos_all_fail_to_decode_is_a_class_without_photos(ray_local, tiny_weights, tmp_path,
                                                                           shrunk_config, monkeypatch):
    """A class whose every photo was unreadable was kept (no photo, no ImageNet row: the model named it at random),
    and the per-photo warnings stayed in the Ray workers' logs."""
    warned = []  # recorded directly: Ray may have reconfigured logging earlier in the session
    monkeypatch.setattr(driver.log, "warning", lambda msg, *args: warned.append(msg % args))
    data = _with_undecodable_class(tmp_path / "d")
    bad = sorted(str(p) for p in (data / CLASSES[2]).iterdir())
    cfg = shrunk_config("train", data=data, out=tmp_path / "m", weights=tiny_weights, mode="fewshot")
    with pytest.raises(ConfigError, match="1 class that has neither photos that could be used nor an ImageNet class "
                                          "to start from: Blue triangle; add photos, or set missing_classes: drop"):
        driver.fit(cfg)
    assert not (tmp_path / "m" / "model.json").exists()
    assert warned == [f"2 of 8 training photos could not be used and were left out (unreadable, not a photo, or too "
                      f"large): {', '.join(bad)}"]

    result = driver.fit(cfg.model_copy(update={"missing_classes": "drop"}))
    spec = load_artifact(result.artifact_dir).spec
    assert spec.class_names == ["Red circle", "Green square"] and spec.training["photos"] == 6
    assert "left out 1 class that has neither photos that could be used nor an ImageNet class: Blue triangle" in warned

    # Fine-tuning paths that compute features first decide on the photos those came from, before Ray Train starts.
    val = make_folders(tmp_path / "v", n=1, seed=1)
    freeze = shrunk_config("train", data=data, val_data=val, out=tmp_path / "f", weights=tiny_weights, mode="freeze")
    with pytest.raises(ConfigError, match="1 class that has neither photos that could be used .*: Blue triangle"):
        driver.fit(freeze)
    assert not (tmp_path / "f" / "run").exists()


@pytest.mark.slow
def test_sigterm_during_training_unwinds_with_one_sentence(tiny_weights, tmp_path, shrunk_yaml):
    """SIGTERM to a training ended with exit 134 and Ray's C++ stack dump: its core worker's handler aborts, and a
    handler raising inside ray.get surfaced as a SystemError. Now: one sentence, exit 1, as the scan."""
    data = make_folders(tmp_path / "d", n=10, classes=CLASSES[:2])
    out = tmp_path / "m"
    config = shrunk_yaml("train", weights=tiny_weights, epochs=4, patience=10, cache_features=False, mode="freeze")
    proc = subprocess.Popen(_job(config, data, out), cwd=REPO, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not (out / "run").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(2.0)  # Ray Train's fit is under way
        assert proc.poll() is None, "the training ended before it could be stopped"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 1, err[-3000:]
    assert err.strip().splitlines()[-1] == "failed: stopped by SIGTERM; nothing was committed", err[-3000:]
    assert "SIGTERM received" not in err and "Traceback" not in err
    assert not (out / "model.json").exists()
