"""Breed taxonomies: ImageNet's dog classes (timm's ImageNet metadata, shipped as imagenet1k.txt) and class folder names.

Folder names of the common layouts become readable breed names:
Stanford Dogs ``n02085620-Chihuahua``, the dog-app's ``001.Affenpinscher`` and plain ``Golden_retriever``.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from pathlib import Path

from dogbreed.errors import UsageError, read_text


class DataError(UsageError):
    """A labelled folder that cannot be used; one readable sentence naming it."""


# ImageNet-1k indices 151..268 are the domestic dog breeds (Chihuahua .. Mexican hairless), the range
# the classic dog-app detector used. 269-272 are wolves and coyotes, 274-275 dhole and African hunting
# dog: wild canids, not dogs. 273 (dingo) is a feral domestic dog and is ImageWoof's "Dingo" breed, so it
# counts as a dog unless the config says otherwise.
DOG_RANGE = range(151, 269)
DINGO = 273

_STANFORD = re.compile(r"^n\d{8}-(.+)$")
_DOGAPP = re.compile(r"^\d+\.(.+)$")


IMAGENET_FILE = Path(__file__).with_name("imagenet1k.txt")


@lru_cache(maxsize=1)
def _imagenet() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(WordNet ids, descriptions) of the 1000 classes, from the copy of timm's ImageNetInfo("imagenet-1k") shipped
    beside this module (a test keeps the two equal): reading it costs a millisecond, importing timm seconds, and
    every scan's driver needs the names."""
    lines = [ln for ln in IMAGENET_FILE.read_text(encoding="utf-8").splitlines() if ln and not ln.startswith("#")]
    wnids, descriptions = zip(*(ln.split("\t") for ln in lines))
    return wnids, descriptions


def imagenet_names() -> list[str]:
    """Readable name of each ImageNet-1k class (the first WordNet synonym)."""
    return [d.split(",")[0].strip() for d in _imagenet()[1]]


def imagenet_wnids() -> list[str]:
    """WordNet id (``n02085620``) of each ImageNet-1k class."""
    return list(_imagenet()[0])


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
    """Comparable form of a breed name: case, '_', '-', spacing and Unicode normalisation (a folder copied from macOS
    spells Löwchen with a combining accent) do not matter."""
    return re.sub(r"[\s_\-]+", " ", unicodedata.normalize("NFC", name)).strip().casefold()


def wnid_from_folder(folder: str) -> str | None:
    """The WordNet id in a Stanford-style folder name, if any."""
    m = re.match(r"^(n\d{8})", folder)
    return m.group(1) if m else None


# Breed names whose ImageNet class WordNet spells otherwise, or whose automatic match would be wrong: canonical name ->
# ImageNet-1k index, or None where ImageNet has no such class. Checked over the dog app's 133 names (tests/test_taxonomy).
SYNONYMS: dict[str, int | None] = {
    "belgian malinois": 225,               # malinois
    "belgian sheepdog": 224,               # groenendael
    "brittany": 215,                       # Brittany spaniel
    "bullmastiff": 243,                    # bull mastiff
    "cavalier king charles spaniel": 156,  # Blenheim spaniel (ImageNet's Blenheim photos are mostly Cavaliers)
    "german shorthaired pointer": 210,     # German short-haired pointer
    "xoloitzcuintli": 268,                 # Mexican hairless
    "japanese chin": 152,                  # Japanese spaniel
    "leonberger": 255,                     # Leonberg
    "entlebucher mountain dog": 241,       # EntleBucher
    "bluetick coonhound": 164,             # bluetick
    "brussels griffon": 262,               # Brabancon griffon
    "american foxhound": 166,              # Walker hound (WordNet: a kind of American foxhound)
    "doberman pinscher": 236,              # Doberman
    "cocker spaniel": None,                # the dog app's (American) cocker; ImageNet 219 is the English one
    "english toy spaniel": None,           # King Charles: not in ImageNet-1k (156 is the Cavalier's row)
    "poodle": None,                        # ImageNet splits it into toy, miniature and standard (265-267)
    "greyhound": None,                     # ImageNet has the Italian greyhound (171) and the whippet (172) only
    "mastiff": None,                       # only the bull mastiff (243) and the Tibetan mastiff (244)
    "pointer": None,                       # only the German short-haired pointer (210)
    "american eskimo dog": None,           # ImageNet's "Eskimo dog" (248) is the husky
    "manchester terrier": None,            # ImageNet's "toy terrier" (158) is a mixed bag of toy breeds
    "smooth fox terrier": None,            # only the wire-haired fox terrier (188)
}


@lru_cache(maxsize=1)
def _imagenet_synonyms() -> dict[str, int]:
    """Every WordNet synonym of every ImageNet class, in comparable form: its class (the first class naming it)."""
    found: dict[str, int] = {}
    for i, description in enumerate(_imagenet()[1]):
        for s in description.split(","):
            found.setdefault(canonical(s), i)
    return found


@lru_cache(maxsize=4096)
def imagenet_index_for(folder: str) -> int | None:
    """ImageNet class of a breed name or folder: the synonym table first, then the WordNet id, then any of the class's
    WordNet synonyms; None if ImageNet-1k has no such class."""
    wanted = canonical(breed_from_folder(folder))
    if wanted in SYNONYMS:
        return SYNONYMS[wanted]
    wnid = wnid_from_folder(folder)
    if wnid:
        wnids = imagenet_wnids()
        if wnid in wnids:
            return wnids.index(wnid)
    return _imagenet_synonyms().get(wanted)


def one_breed_twice(classes: list[str]) -> str | None:
    """Two class names (or folders) of one breed, in words, or None: the same name however spelt (see canonical), or
    two names of one ImageNet class (Samoyed and Samoyede, Brittany and Brittany spaniel). Two classes of one breed
    split its photos and probability: the one without photos won every answer."""
    names: dict[str, str] = {}
    classes_of: dict[int, str] = {}
    for c in classes:
        key, index = canonical(breed_from_folder(c)), imagenet_index_for(c)
        if key in names:
            return f"{names[key]!r} and {c!r}"
        if index is not None and index in classes_of:
            return f"{classes_of[index]!r} and {c!r} (both ImageNet's {imagenet_names()[index]})"
        names[key] = c
        if index is not None:
            classes_of[index] = c
    return None


BUILTIN_CLASSES = {"dogapp133": Path(__file__).with_name("dogapp133.txt")}  # the dog app's 133 classes


def read_classes(source: str | Path) -> list[str]:
    """A taxonomy file's classes, in order: one per line, in any supported form (``001.Affenpinscher``, plain
    ``Golden retriever``, Stanford ``n02085620-Chihuahua``); blank lines and ``#`` comments skipped. ``dogapp133`` names
    the dog app's own list, shipped with dogbreed. A duplicate (same breed twice) is refused."""
    path = BUILTIN_CLASSES.get(str(source), Path(source))
    try:
        lines = read_text(path, "utf-8-sig").splitlines()  # a byte-order mark (Windows editors) is not a name
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read the classes file {source}: {getattr(e, 'strerror', None) or e}") from None
    classes = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    twice = one_breed_twice(classes)
    if twice:
        raise DataError(f"the classes file {source} names one breed twice: {twice}")
    if len(classes) < 2:
        raise DataError(f"the classes file {source} needs two classes at least (found {len(classes)})")
    return classes
