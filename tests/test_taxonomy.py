"""Breed names from folder layouts and ImageNet's dog classes."""

import pytest

from dogbreed.breeds import taxonomy


@pytest.mark.parametrize("folder, name", [
    ("n02085620-Chihuahua", "Chihuahua"),            # Stanford Dogs
    ("001.Affenpinscher", "Affenpinscher"),          # dog-app dogImages
    ("Golden_retriever", "Golden retriever"),        # plain
    ("Shih-Tzu", "Shih-Tzu"),
])
def test_breed_from_folder(folder, name):
    assert taxonomy.breed_from_folder(folder) == name


def test_dog_classes_are_imagenet_dogs_plus_dingo():
    names = taxonomy.imagenet_names()
    idx = taxonomy.dog_class_indices()
    assert len(idx) == 119 and names[idx[0]] == "Chihuahua" and names[idx[-2]] == "Mexican hairless"
    assert names[273] == "dingo" and 273 in idx and 273 not in taxonomy.dog_class_indices(count_dingo=False)
    assert "timber wolf" not in {names[i] for i in idx}


@pytest.mark.parametrize("folder, index", [
    ("Golden_retriever", 207), ("Old_English_sheepdog", 229), ("n02085620-Chihuahua", 151), ("Dingo", 273),
    ("003.Airedale_terrier", 191), ("Labradoodle", None),
])
def test_folder_to_imagenet_class(folder, index):
    assert taxonomy.imagenet_index_for(folder) == index


# The dog app's 133 classes (by number) -> ImageNet-1k class, or None where ImageNet has no such breed. Checked by
# hand against WordNet; 86 are ImageNet classes. labels.csv of ../shared/data/newbreeds agrees except where it marks
# 8 breeds as missing that ImageNet has under another name (test below).
DOGAPP133 = {
    "001": 252, "002": 160, "003": 191, "004": None, "005": 249, "006": None, "007": 166, "008": 180, "009": None,
    "010": None, "011": None, "012": None, "013": 193, "014": 253, "015": 161, "016": 162, "017": None,
    "018": None, "019": 181, "020": 225, "021": 224, "022": None, "023": 239, "024": None, "025": 165, "026": None,
    "027": 163, "028": 164, "029": 232, "030": 182, "031": 169, "032": 195, "033": 233, "034": 242, "035": None,
    "036": 226, "037": 215, "038": 262, "039": None, "040": None, "041": 243, "042": 192, "043": None, "044": None,
    "045": 264, "046": 156, "047": 209, "048": 151, "049": None, "050": None, "051": 260, "052": 216, "053": None,
    "054": 231, "055": 206, "056": None, "057": 251, "058": 194, "059": 236, "060": None, "061": 219, "062": 212,
    "063": 217, "064": None, "065": 241, "066": None, "067": None, "068": 205, "069": 245, "070": None, "071": 235,
    "072": 210, "073": None, "074": 197, "075": None, "076": 207, "077": 214, "078": 246, "079": 257, "080": 238,
    "081": None, "082": None, "083": 173, "084": None, "085": None, "086": 213, "087": 184, "088": 221, "089": 170,
    "090": 171, "091": 152, "092": 261, "093": 183, "094": 228, "095": 222, "096": 208, "097": 189, "098": 255,
    "099": 204, "100": None, "101": 153, "102": None, "103": None, "104": 196, "105": None, "106": 256, "107": 185,
    "108": None, "109": 174, "110": None, "111": 186, "112": None, "113": 229, "114": 175, "115": 157, "116": None,
    "117": 154, "118": 263, "119": None, "120": None, "121": None, "122": None, "123": 259, "124": None,
    "125": None, "126": 247, "127": 201, "128": None, "129": 244, "130": 218, "131": None, "132": 268, "133": 187,
}


def test_the_synonym_table_over_all_133_dog_app_names():
    classes = taxonomy.read_classes("dogapp133")
    assert len(classes) == 133 and classes[0] == "001.Affenpinscher" and classes[-1] == "133.Yorkshire_terrier"
    assert {c.split(".", 1)[0]: taxonomy.imagenet_index_for(c) for c in classes} == DOGAPP133
    assert sum(v is not None for v in DOGAPP133.values()) == 86
    mapped = [v for v in DOGAPP133.values() if v is not None]
    assert len(mapped) == len(set(mapped))  # no ImageNet class stands for two breeds
    names = taxonomy.imagenet_names()
    for breed, imagenet in [("Belgian sheepdog", "groenendael"), ("Belgian malinois", "malinois"),
                            ("Brittany", "Brittany spaniel"), ("Bull mastiff", "bull mastiff"),
                            ("Cavalier King Charles spaniel", "Blenheim spaniel"),
                            ("German shorthaired pointer", "German short-haired pointer"),
                            ("Xoloitzcuintli", "Mexican hairless")]:
        assert names[taxonomy.imagenet_index_for(breed)] == imagenet, breed


@pytest.mark.parametrize("text, reason", [("001.Akita\n002.Akita\n", "names one breed twice"), ("Akita\n", "two classes")])
def test_a_bad_classes_file_is_one_sentence(tmp_path, text, reason):
    path = tmp_path / "classes.txt"
    path.write_text(text)
    with pytest.raises(taxonomy.DataError, match=reason):
        taxonomy.read_classes(path)


def test_a_classes_file_takes_every_name_form_and_skips_comments(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("# mine\n004.Akita\nGolden retriever\n\nn02085620-Chihuahua\n")
    classes = taxonomy.read_classes(path)
    assert classes == ["004.Akita", "Golden retriever", "n02085620-Chihuahua"]
    assert [taxonomy.imagenet_index_for(c) for c in classes] == [None, 207, 151]
    path.write_bytes(b"\xef\xbb\xbfGolden retriever\r\n004.Akita\r\n")  # a Windows editor's BOM and CRLF
    assert taxonomy.read_classes(path) == ["Golden retriever", "004.Akita"]


@pytest.mark.shared_data
def test_newbreeds_labels_agree_with_the_table_but_for_breeds_imagenet_names_otherwise(shared_data):
    import csv

    rows = list(csv.DictReader(open(shared_data / "newbreeds" / "labels.csv", encoding="utf-8")))
    theirs = {r["dogapp133_class"]: int(r["imagenet_index"]) if r["imagenet_index"] else None
              for r in rows if r["dogapp133_class"]}
    differ = {c for c, v in theirs.items() if DOGAPP133[c.split(".", 1)[0]] != v}
    assert differ == {"007.American_foxhound", "028.Bluetick_coonhound", "041.Bullmastiff",
                      "046.Cavalier_king_charles_spaniel", "065.Entlebucher_mountain_dog",
                      "072.German_shorthaired_pointer", "091.Japanese_chin", "098.Leonberger"}
    assert all(theirs[c] is None for c in differ)  # each one labels.csv calls missing, ImageNet has


def test_the_shipped_imagenet_classes_are_timms():
    """dogbreed reads ImageNet's 1000 classes from its own copy (imagenet1k.txt), so that describing a model needs no
    timm import (seconds); the copy must stay timm's ImageNetInfo, class for class."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo("imagenet-1k")
    assert taxonomy.imagenet_wnids() == [info.index_to_label_name(i) for i in range(1000)]
    assert list(taxonomy._imagenet()[1]) == [info.index_to_description(i) for i in range(1000)]
    assert taxonomy.imagenet_names()[207] == "golden retriever"


@pytest.mark.parametrize("lines, named", [
    ("Samoyed\nSamoyede\nBeagle\n", "'Samoyed' and 'Samoyede' (both ImageNet's Samoyed)"),
    ("Doberman pinscher\nDoberman\n", "'Doberman pinscher' and 'Doberman' (both ImageNet's Doberman)"),
    ("Brittany\nBrittany spaniel\n", "'Brittany' and 'Brittany spaniel' (both ImageNet's Brittany spaniel)"),
    ("Shih-Tzu\nShih_Tzu\n", "'Shih-Tzu' and 'Shih_Tzu'"),
    ("L\u00f6wchen\nLo\u0308wchen\n", "'L\u00f6wchen' and 'Lo\u0308wchen'")])
def test_a_classes_file_naming_one_breed_twice_by_a_synonym_or_a_spelling_is_refused(tmp_path, lines, named):
    """Samoyed + Samoyede were two classes: the one without photos kept ImageNet's row and won every answer, so the
    model scored 0% on its own training photos."""
    (tmp_path / "c.txt").write_text(lines, encoding="utf-8")
    with pytest.raises(taxonomy.DataError, match="names one breed twice") as e:
        taxonomy.read_classes(tmp_path / "c.txt")
    assert str(e.value).endswith(named)


def test_a_folder_copied_from_macos_matches_its_class_whatever_the_unicode_form():
    """evaluate left an NFD Löwchen folder out against the model's NFC Löwchen class."""
    assert taxonomy.canonical("Lo\u0308wchen") == taxonomy.canonical("L\u00f6wchen") == "l\u00f6wchen"
    assert taxonomy.one_breed_twice(taxonomy.read_classes("dogapp133")) is None
