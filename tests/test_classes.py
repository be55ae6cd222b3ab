"""The ImageNet-1k class index and the ImageNet-9 mapping shipped in data_manifests/."""

from __future__ import annotations

import json
from collections import Counter

from pipeline import classes


def _tsv_rows() -> list[list[str]]:
    lines = classes.IN1K_FILE.read_text(encoding="utf-8").splitlines()
    return [line.split("\t") for line in lines if line and not line.startswith("#")]


def test_imagenet_tsv_has_1000_ordered_rows_with_unique_wnids():
    rows = _tsv_rows()
    assert len(rows) == 1000
    assert all(len(row) == 3 for row in rows)
    assert [int(row[0]) for row in rows] == list(range(1000))
    wnids = [row[1] for row in rows]
    assert len(set(wnids)) == 1000
    assert all(w.startswith("n") and len(w) == 9 and w[1:].isdigit() for w in wnids)
    assert all(row[2].strip() for row in rows)


def test_class_index_reads_the_tsv():
    index = classes.imagenet_classes()
    assert len(index) == 1000
    assert index.wnids[281] == "n02123045"
    assert "tabby" in index.names[281].lower()
    assert classes.wnid_to_index()["n02123045"] == 281
    assert index.index_of[index.wnids[999]] == 999


def test_in9_mapping_counts():
    raw = json.loads(classes.IN9_MAP_FILE.read_text())
    assert len(raw) == 1000
    assert set(raw) == {str(i) for i in range(1000)}
    mapping = classes.in9_mapping()
    assert len(mapping) == 1000
    mapped = [i for i, sup in enumerate(mapping) if sup >= 0]
    assert len(mapped) == 370
    counts = Counter(sup for sup in mapping if sup >= 0)
    assert sorted(counts.values(), reverse=True) == [116, 52, 42, 36, 35, 27, 26, 20, 16]
    assert set(counts) == set(range(9))
    assert all(sup == -1 for sup in mapping if sup < 0)


def test_in9_members_partition_the_mapped_classes():
    members = classes.in9_members()
    assert len(members) == 9
    flat = [i for group in members for i in group]
    assert len(flat) == len(set(flat)) == 370  # no index mapped to two superclasses
    for sup, group in enumerate(members):
        assert all(classes.to_in9(i) == sup for i in group)


def test_in9_names():
    names = classes.in9_names()
    assert len(names) == 9
    assert len(set(names)) == 9
    assert names[0] == "Dog"
    assert names[classes.to_in9(0)] == "Fish"  # tench
    assert names[classes.to_in9(151)] == "Dog"  # Chihuahua
    assert names[classes.to_in9(288)] == "Carnivore"  # leopard
    assert classes.to_in9(281) == -1  # ImageNet-9 leaves the domestic cats out
