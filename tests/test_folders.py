"""Labelled folders: every layout read one way, and one rule for matching a folder to a class."""

import os
from pathlib import Path

import pytest

from dogbreed.breeds.folders import DataError, class_folders, class_index, evaluation_photos, labelled_items, split_folders


def _touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_class_folders_of_each_layout(tmp_path):
    for name in ("Beagle/a.jpg", "Beagle/sub/b.JPG", "Golden_retriever/c.png", "Golden_retriever/notes.txt", "loose.jpg"):
        _touch(tmp_path / "plain" / name)
    classes = class_folders(tmp_path / "plain")
    assert list(classes) == ["Beagle", "Golden_retriever"]  # a file directly in the root has no label
    assert [Path(p).name for p in classes["Beagle"]] == ["a.jpg", "b.JPG"]  # recursive, by extension
    assert [Path(p).name for p in classes["Golden_retriever"]] == ["c.png"]

    for name in ("n02085620-Chihuahua/1.jpg", "n02085782-Japanese_spaniel/2.jpg"):
        _touch(tmp_path / "stanford" / "Images" / name)
    assert list(class_folders(tmp_path / "stanford")) == ["n02085620-Chihuahua", "n02085782-Japanese_spaniel"]

    for split in ("train", "valid", "test"):
        _touch(tmp_path / "dogImages" / split / "001.Affenpinscher" / "x.jpg")
    assert set(split_folders(tmp_path / "dogImages")) == {"train", "val", "test"}
    assert split_folders(tmp_path / "plain") is None


def test_breed_folders_beside_a_layout_folder_are_named_as_left_out(tmp_path, caplog):
    """A tree with Beagle/ and Samoyed/ beside an Images/ (or train/ and valid/) folder trained on that folder
    alone: 20 photos of the other breeds left out, without a word."""
    for name in ("Beagle/a.jpg", "Samoyed/b.jpg", "Images/Akita/c.jpg", "Images/Lowchen/d.jpg"):
        _touch(tmp_path / "im" / name)
    for name in ("Beagle/a.jpg", "train/Akita/c.jpg", "valid/Akita/d.jpg", "test/Akita/e.jpg"):
        _touch(tmp_path / "sv" / name)
    with caplog.at_level("WARNING", logger="dogbreed.breeds"):
        assert list(class_folders(tmp_path / "im")) == ["Akita", "Lowchen"]
        assert set(split_folders(tmp_path / "sv")) == {"train", "val", "test"}
    assert "holds Images/ (Stanford Dogs' layout): only that is read; the folders beside it are left out: Beagle, " \
        "Samoyed" in caplog.text
    assert "the folders beside it are left out: Beagle" in caplog.text.split("sv holds")[1]
    caplog.clear()
    with caplog.at_level("WARNING", logger="dogbreed.breeds"):
        class_folders(tmp_path / "im" / "Images")
        split_folders(tmp_path / "sv" / "train")
    assert not caplog.text  # a plain tree says nothing


def test_a_name_that_is_not_utf8_is_kept_exactly(tmp_path):
    raw = os.fsencode(str(tmp_path)) + b"/A/caf\xe9.jpg"
    os.makedirs(os.fsencode(str(tmp_path / "A")), exist_ok=True)
    with open(raw, "wb") as f:
        f.write(b"x")
    _touch(tmp_path / "B" / "b.jpg")
    (path,) = class_folders(tmp_path)["A"]
    assert os.fsencode(path) == raw


def test_one_matching_rule_for_folder_names(tmp_path):
    match = class_index(["Golden retriever", "Chihuahua", "Maltese dog"])
    assert match("Golden_retriever") == 0 and match("041.golden-retriever") == 0
    assert match("n02085620-Chihuahua") == 1
    assert match("Maltese_terrier") == 2  # the same ImageNet class, by one of its synonyms
    assert match("Beagle") is None
    with pytest.raises(DataError, match="Beagle"):
        labelled_items({"Beagle": ["/p.jpg"]}, ["Chihuahua"], tmp_path)


def test_evaluation_photos_reads_categories_and_breed_folders(tmp_path):
    _touch(tmp_path / "humans" / "h.jpg")
    _touch(tmp_path / "other" / "o.png")
    _touch(tmp_path / "dogs" / "Beagle" / "b.jpg")
    _touch(tmp_path / "dogs" / "Pug" / "p.jpg")
    photos = evaluation_photos([str(tmp_path / "humans"), str(tmp_path / "other"), str(tmp_path / "dogs")])
    assert photos.category == ["human", "other", "dog", "dog"]
    assert photos.folder == [None, None, "Beagle", "Pug"]


@pytest.mark.shared_data
def test_evaluation_photos_of_the_shared_data(shared_data):
    photos = evaluation_photos([str(shared_data / "imagewoof" / "val-unseen"), str(shared_data / "humans")])
    assert photos.category.count("dog") == 200 and photos.category.count("human") == 60
    assert set(f for f in photos.folder if f) == {p.name for p in (shared_data / "imagewoof" / "val-unseen").iterdir()}
