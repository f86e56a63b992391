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
