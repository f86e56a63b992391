"""New breeds from a handful of photos: a taxonomy file, calibrated prototypes beside the ImageNet head, classes kept
from ImageNet without photos, classes with neither refused; on synthetic features, on real photos, and through a
real `dogbreed train` and `dogbreed scan`."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dogbreed.breeds.taxonomy import imagenet_index_for
from dogbreed.config import ConfigError
from dogbreed.train import data as train_data
from dogbreed.train.driver import _keep_answerable
from dogbreed.train.fewshot import NEG, fit_prototypes
from dogbreed.vision.models import load_default
from dogbreed.vision.nets import BreedNet, PrototypeHead

DOGBREED = Path(sys.executable).with_name("dogbreed")
REPO = Path(__file__).resolve().parents[1]


def synthetic(n_per: int = 4, d: int = 32, seed: int = 0):
    """4 classes: 0 and 1 ImageNet classes with photos, 2 an ImageNet class without photos, 3 a new one with photos."""
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(1000, d)).astype(np.float32)
    b = np.zeros(1000, np.float32)
    index = np.array([151, 152, 153, -1])
    centres = np.stack([W[151], W[152], W[153], rng.normal(size=d).astype(np.float32) * 2])
    X = np.concatenate([centres[c] + 0.3 * rng.normal(size=(n_per, d)) for c in (0, 1, 3)]).astype(np.float32)
    y = np.repeat([0, 1, 3], n_per)
    return X, y, index, W, b, centres


def scores(fit, W, b, X):
    head = PrototypeHead(X.shape[1], len(fit.imagenet_index))
    fit.load_into(head)
    with torch.no_grad():
        return head(torch.from_numpy(X), torch.from_numpy(X @ W.T + b)).numpy()


def test_prototypes_answer_new_breeds_keep_imagenet_breeds_without_photos_and_never_name_neither():
    X, y, index, W, b, centres = synthetic()
    index = np.append(index, -1)  # class 4: neither photos nor an ImageNet class
    fit = fit_prototypes(X, None, y, index, W, b)
    assert fit.bias[4] <= NEG / 2 and fit.loo_top1 > 0.9
    rng = np.random.default_rng(1)
    probe = np.stack([centres[c] + 0.3 * rng.normal(size=X.shape[1]) for c in (0, 1, 2, 3)]).astype(np.float32)
    assert scores(fit, W, b, probe).argmax(1).tolist() == [0, 1, 2, 3]  # class 2 has no photo: named from ImageNet


def test_views_count_as_evidence_and_the_fit_is_reproducible():
    X, y, index, W, b, _ = synthetic()
    views = np.stack([X + 0.05, X[:, ::-1].copy()], 1)
    a = fit_prototypes(X, views, y, index, W, b)
    b2 = fit_prototypes(X, views, y, index, W, b)
    assert a.calibration == b2.calibration and np.array_equal(a.rows, b2.rows)


def test_a_prototype_head_round_trips_through_an_artifact(tmp_path):
    from dogbreed.vision.models import ModelSpec, load_artifact, save_artifact

    base = load_default()
    net = BreedNet(base.net.backbone, 3, head="prototypes")
    net.breed_head.imagenet_index.copy_(torch.tensor([207, -1, 151]))
    net.breed_head.rows.normal_()
    save_artifact(net, ModelSpec(backbone=base.spec.backbone, class_names=["Golden retriever", "Akita", "Chihuahua"],
                                 breed_source="head", head="prototypes", preprocessing=base.spec.preprocessing), tmp_path)
    loaded = load_artifact(tmp_path)
    assert loaded.spec.head == "prototypes" and loaded.embedding_id == base.embedding_id  # same backbone: relabel works
    assert torch.equal(loaded.net.breed_head.rows, net.breed_head.rows)


def _folders(root: Path, spec: dict[str, int]) -> Path:
    for name, n in spec.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            shutil.copy(REPO / "dogbreed" / "samples" / "grace_hopper.jpg", root / name / f"{i}.jpg")
    return root


def test_a_taxonomy_fixes_the_classes_and_a_class_with_neither_is_refused_or_dropped(tmp_path):
    data = _folders(tmp_path / "data", {"Akita": 2, "Golden_retriever": 2, "Labradoodle": 3})
    classes = ["004.Akita", "076.Golden_retriever", "048.Chihuahua", "Cane corso"]
    splits = train_data.make_splits(str(data), classes=classes, carve=False)
    assert splits.class_names == ["Akita", "Golden retriever", "Chihuahua", "Cane corso"]
    assert sorted({label for _, label in splits.train}) == [0, 1]  # Labradoodle is not a class: left out
    with pytest.raises(ConfigError, match=r"1 class that has neither photos that could be used nor an ImageNet class .*Cane corso"):
        _keep_answerable(splits, "refuse")
    kept = _keep_answerable(splits, "drop")
    assert kept.class_names == ["Akita", "Golden retriever", "Chihuahua"]  # Chihuahua: no photos, ImageNet has it
    assert imagenet_index_for(kept.class_folders[2]) == 151


@pytest.mark.slow  # 120 real photos through the decoder and the network
def test_fewshot_beats_prototype_free_training_on_a_small_real_split(shared_data):
    """On photos it did not train on: 20 dog-app breeds, 10 of them ImageNet ones, one held-out photo each."""
    import csv

    from dogbreed.config import ScanConfig
    from dogbreed.evaluation.breeds import analyze
    from dogbreed.train.loop import BreedLogits, eval_one_epoch, make_optimizer, train_one_epoch

    rows = list(csv.DictReader(open(shared_data / "newbreeds" / "labels.csv", encoding="utf-8")))
    by_class: dict[str, list[str]] = {}
    for r in rows:
        if r["dogapp133_class"]:
            by_class.setdefault(r["dogapp133_class"], []).append(str(shared_data / "newbreeds" / r["file"]))
    full = sorted(c for c, files in by_class.items() if len(files) >= 5)
    known = [c for c in full if imagenet_index_for(c) is not None][:10]
    new = [c for c in full if imagenet_index_for(c) is None][:10]
    classes = known + new
    paths = [p for c in classes for p in sorted(by_class[c])[:6]]
    labels = np.array([classes.index(c) for c in classes for _ in sorted(by_class[c])[:6]])
    df = analyze(paths, ScanConfig())
    X = np.stack(df["embedding"].to_numpy()).astype(np.float32)
    test = np.zeros(len(paths), bool)
    test[[np.flatnonzero(labels == c)[0] for c in range(len(classes))]] = True
    base = load_default()
    W, b = (t.detach().numpy() for t in (base.net.backbone.get_classifier().weight, base.net.backbone.get_classifier().bias))
    index = np.array([-1 if (i := imagenet_index_for(c)) is None else i for c in classes])
    fit = fit_prototypes(X[~test], None, labels[~test], index, W, b)
    fewshot = (scores(fit, W, b, X[test]).argmax(1) == labels[test]).mean()
    torch.manual_seed(0)  # prototype-free: a random linear head trained on the same features (the seed's loop)
    net = BreedNet(base.net.backbone, len(classes))
    model = BreedLogits(net, from_features=True)
    optimizer, scheduler = make_optimizer([{"params": net.breed_head.parameters(), "lr": 1e-2}], 1e-4, 60)
    batches = [(torch.from_numpy(X[~test]), torch.from_numpy(labels[~test]))]
    for _ in range(60):
        train_one_epoch(model, batches, torch.nn.CrossEntropyLoss(label_smoothing=0.1), optimizer, scheduler)
    free = eval_one_epoch(model, [(torch.from_numpy(X[test]), torch.from_numpy(labels[test]))], torch.nn.CrossEntropyLoss()).acc
    print(f"held-out top-1: few-shot {fewshot:.0%}, prototype-free {free:.0%}")
    assert fewshot > free


@pytest.mark.slow  # a real `dogbreed train --mode fewshot` (Ray Data) and a real scan
def test_a_fewshot_model_trained_with_a_taxonomy_names_a_breed_imagenet_lacks_in_a_scan(tmp_path, shared_data):
    """Akita is not an ImageNet class: the default model can never name it; the few-shot model does.

    Three Akita photos are held out (ones the ImageNet head calls a dog; two other Akita photos in the set it
    does not), the model learns Akita from the other eight, and a real scan names it on most of them.
    """
    src = shared_data / "newbreeds"
    data = tmp_path / "data"
    held = tmp_path / "held" / "Akita"
    for breed in ("Akita", "Golden_retriever", "Samoyed", "Beagle"):
        photos = sorted((src / breed).glob("*.jpg"))
        kept = [p for i, p in enumerate(photos) if not (breed == "Akita" and 2 <= i < 5)]
        (data / breed).mkdir(parents=True)
        for p in kept:
            shutil.copy(p, data / breed / p.name)
        if breed == "Akita":
            held.mkdir(parents=True)
            for p in photos[2:5]:
                shutil.copy(p, held / p.name)
    (tmp_path / "classes.txt").write_text("004.Akita\n076.Golden_retriever\n016.Beagle\nSamoyed\n")
    model = tmp_path / "model"
    train = subprocess.run([str(DOGBREED), "train", str(data), "--classes", str(tmp_path / "classes.txt"),
                            "--mode", "fewshot", "--out", str(model)], capture_output=True, text=True, timeout=900)
    assert train.returncode == 0, train.stderr[-3000:]
    scan = subprocess.run([str(DOGBREED), "scan", str(held), "--out", str(tmp_path / "out"), "--model", str(model)],
                          capture_output=True, text=True, timeout=600)
    assert scan.returncode == 0, scan.stderr[-3000:]
    from dogbreed.table import readers
    from dogbreed.vision.models import read_artifact_spec

    rows = readers.latest(tmp_path / "out")
    assert len(rows) == 3 and set(rows["model_id"]) == {read_artifact_spec(model)[1]}
    assert rows["status"].isin(["dog", "dog_and_human"]).all()
    assert (rows["dog_score"] > 0.5).all()  # the dog score is still the ImageNet head's
    assert (rows["breed"] == "Akita").sum() >= 2, rows[["path", "breed"]]
    assert all("Akita" in [b["breed"] for b in breeds] for breeds in rows["breeds"])
