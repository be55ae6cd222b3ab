"""ImageNet-1k class index and the ImageNet-9 superclass mapping, read from data_manifests/."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

from data_manifests import data_file

# The label spaces: ImageNet-1k class indices and ImageNet-9 superclasses (the shard format's .cls and in9_label).
IN1K_CLASSES = 1000
IN9_CLASSES = 9

IN1K_FILE = data_file("imagenet_classes.tsv")
IN9_MAP_FILE = data_file("in_to_in9.json")
IN9_NAMES_FILE = data_file("in9_classes.txt")


@dataclass(frozen=True)
class ClassIndex:
    """ImageNet-1k: index <-> wnid <-> human name."""

    wnids: tuple[str, ...]
    names: tuple[str, ...]

    @property
    def index_of(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(self.wnids)}

    def __len__(self) -> int:
        return len(self.wnids)


@lru_cache(maxsize=1)
def imagenet_classes() -> ClassIndex:
    """Rows of ``index<TAB>wnid<TAB>name``; comment lines start with '#'."""
    wnids: list[str] = []
    names: list[str] = []
    for line in IN1K_FILE.read_text(encoding="utf-8").splitlines():
        if not line or line.startswith("#"):
            continue
        index, wnid, name = line.split("\t")
        if int(index) != len(wnids):
            raise ValueError(f"{IN1K_FILE}: rows out of order at index {index}")
        wnids.append(wnid)
        names.append(name)
    return ClassIndex(tuple(wnids), tuple(names))


@lru_cache(maxsize=1)
def wnid_to_index() -> dict[str, int]:
    return imagenet_classes().index_of


def canonical_wnid(label: int) -> str:
    """The wnid of a class index as one shared string: a reader keeps this, not its own copy per record."""
    return imagenet_classes().wnids[label]


@lru_cache(maxsize=1)
def in9_mapping() -> tuple[int, ...]:
    """ImageNet-1k index -> ImageNet-9 superclass index, -1 where unmapped."""
    raw = json.loads(IN9_MAP_FILE.read_text())
    return tuple(int(raw[str(i)]) for i in range(IN1K_CLASSES))


@lru_cache(maxsize=1)
def in9_names() -> tuple[str, ...]:
    """Superclass names in index order (Dog, Bird, ...)."""
    return tuple(
        line.split()[0] for line in IN9_NAMES_FILE.read_text().splitlines() if line.strip()
    )


def to_in9(label: int) -> int:
    """Superclass of an ImageNet-1k label, -1 if it is not one of the 370 IN-9 classes."""
    return in9_mapping()[label]


def in9_members() -> list[list[int]]:
    """For each superclass, the ImageNet-1k indices that map to it."""
    members: list[list[int]] = [[] for _ in in9_names()]
    for index, sup in enumerate(in9_mapping()):
        if sup >= 0:
            members[sup].append(index)
    return members
