"""Breed taxonomies: ImageNet's dog classes (from timm's ImageNet metadata) and class folder names.

Folder names of the common layouts become readable breed names:
Stanford Dogs ``n02085620-Chihuahua``, the dog-app's ``001.Affenpinscher`` and plain ``Golden_retriever``.
"""

from __future__ import annotations

import re
from functools import lru_cache

# ImageNet-1k indices 151..268 are the domestic dog breeds (Chihuahua .. Mexican hairless), the range
# the classic dog-app detector used. 269-272 are wolves and coyotes, 274-275 dhole and African hunting
# dog: wild canids, not dogs. 273 (dingo) is a feral domestic dog and is ImageWoof's "Dingo" breed, so it
# counts as a dog unless the config says otherwise.
DOG_RANGE = range(151, 269)
DINGO = 273

_STANFORD = re.compile(r"^n\d{8}-(.+)$")
_DOGAPP = re.compile(r"^\d+\.(.+)$")


@lru_cache(maxsize=1)
def _imagenet():
    from timm.data import ImageNetInfo  # timm ships the 1k class names and WordNet ids offline

    return ImageNetInfo("imagenet-1k")


def imagenet_names() -> list[str]:
    """Readable name of each ImageNet-1k class (the first WordNet synonym)."""
    info = _imagenet()
    return [info.index_to_description(i).split(",")[0].strip() for i in range(1000)]


def imagenet_wnids() -> list[str]:
    """WordNet id (``n02085620``) of each ImageNet-1k class."""
    info = _imagenet()
    return [info.index_to_label_name(i) for i in range(1000)]


def readable(name: str) -> str:
    """Sentence case for display: ImageNet writes 'golden retriever' beside 'Labrador retriever'."""
    return name[:1].upper() + name[1:]


def dog_class_indices(count_dingo: bool = True) -> list[int]:
    """ImageNet indices whose probability mass makes the dog score."""
    return list(DOG_RANGE) + ([DINGO] if count_dingo else [])


def breed_from_folder(folder: str) -> str:
    """Readable breed name from a class folder name in any of the supported layouts."""
    name = folder
    for pattern in (_STANFORD, _DOGAPP):
        m = pattern.match(name)
        if m:
            name = m.group(1)
            break
    return name.replace("_", " ").strip()


def canonical(name: str) -> str:
    """Comparable form of a breed name: case, '_', '-' and spacing do not matter."""
    return re.sub(r"[\s_\-]+", " ", name).strip().lower()


def wnid_from_folder(folder: str) -> str | None:
    """The WordNet id in a Stanford-style folder name, if any."""
    m = re.match(r"^(n\d{8})", folder)
    return m.group(1) if m else None


@lru_cache(maxsize=4096)
def imagenet_index_for(folder: str) -> int | None:
    """ImageNet class of a breed folder, matched by WordNet id or by any synonym; None if not an ImageNet class."""
    wnid = wnid_from_folder(folder)
    if wnid:
        wnids = imagenet_wnids()
        if wnid in wnids:
            return wnids.index(wnid)
    wanted = canonical(breed_from_folder(folder))
    info = _imagenet()
    for i in range(1000):
        if any(canonical(s) == wanted for s in info.index_to_description(i).split(",")):
            return i
    return None
