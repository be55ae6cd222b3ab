"""The partner cache: each source decoded once per build, the same bytes as without it, bounded and cleaned up.

Builds go through ``builders.make_shards.build`` in this process with one
worker, so a counting wrapper around ``prepare_sample`` sees every decode.
Kills and full disks on the cached path are in ``test_reliability_builder``.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import builders.shards
from bench.imagenet_tree import make_val_tree
from builders import partner_cache
from builders.make_shards import build, parse_args
from builders.partner_cache import CACHE_DIR, ChunkCacheWriter, RowLayout, read_marker
from pipeline.frame import Frame
from pipeline.prepare import PreparedSample
from pipeline.records import RejectedInput, SourceRecord
from pipeline.variants import VARIANT_SPECS, VARIANTS

ROOT = Path(__file__).resolve().parent.parent
WNIDS = ("n01440764", "n01443537", "n02099601", "n02123045")
N_IMAGES = 16
FRAME = ["--size", "36", "--resize", "40", "--shard-size", "4", "--no-progress"]  # 36: rows of mask bits end mid-byte
MIXED = tuple(v for v, spec in VARIANT_SPECS.items() if spec.partner)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, Path]:
    return make_val_tree(tmp_path_factory.mktemp("src"), N_IMAGES, classes=WNIDS,
                         size_choices=((128, 96), (96, 128), (112, 112)))


def run(tree, out: Path, *extra: str, monkeypatch=None) -> tuple[dict, list[str], Counter]:
    """(manifests, notes, how often each source was prepared) of one in-process build."""
    prepared: Counter[str] = Counter()
    if monkeypatch is not None:
        real = builders.shards.prepare_sample

        def counting(record, *args, **kwargs):
            prepared[record.key] += 1
            return real(record, *args, **kwargs)

        monkeypatch.setattr(builders.shards, "prepare_sample", counting)
    config, _ = parse_args(["--source", "imagenet-val", "--images", str(tree[0]), "--annotations", str(tree[1]),
                            "--out", str(out), *FRAME, "--workers", "1", *extra])
    notes: list[str] = []
    manifests = build(config, progress=False, note=notes.append)
    if monkeypatch is not None:
        monkeypatch.undo()
    return manifests, notes, prepared


def tar_hashes(out: Path) -> dict[str, str]:
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*/*.tar"))}


def published(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.glob("[!.]*/*")) if p.is_file()}


# --------------------------------------------------------------------------- same bytes, one decode


@pytest.mark.parametrize("extra", [(), ("--fill", "noise", "--with-masks", "--partner-level", "in9")])
def test_shards_are_byte_identical_with_and_without_the_cache(tree, tmp_path, monkeypatch, extra):
    cached, notes, prepared = run(tree, tmp_path / "cached", "--variant", "all", *extra, monkeypatch=monkeypatch)
    plain, plain_notes, plain_prepared = run(tree, tmp_path / "plain", "--variant", "all",
                                             "--partner-cache-limit", "0", *extra, monkeypatch=monkeypatch)
    assert len(notes) == 1 and notes[0].startswith(f"partner cache: {N_IMAGES} sources"), notes
    assert plain_notes == []  # off by request: nothing to say
    hashes, plain_hashes = tar_hashes(tmp_path / "cached"), tar_hashes(tmp_path / "plain")
    assert len(hashes) == len(VARIANTS) * N_IMAGES // 4
    assert hashes == plain_hashes  # every shard of every variant, byte for byte
    assert published(tmp_path / "cached") == published(tmp_path / "plain")  # manifests too
    assert cached == plain
    # with the cache every source is decoded and framed exactly once for all nine variants ...
    assert prepared == Counter(dict.fromkeys(prepared, 1)) and len(prepared) == N_IMAGES
    # ... without it, partners in other shards are decoded again
    assert sum(plain_prepared.values()) > N_IMAGES
    assert not (tmp_path / "cached" / CACHE_DIR).exists()


def test_mixed_variant_alone_decodes_each_source_once(tree, tmp_path, monkeypatch):
    _, notes, prepared = run(tree, tmp_path / "out", "--variant", "mixed_rand", monkeypatch=monkeypatch)
    row = RowLayout(36).nbytes
    assert notes == [f"partner cache: {N_IMAGES} sources x {row / 1e3:.1f} kB = {N_IMAGES * row / 1e6:.1f} MB under "
                     f"{tmp_path / 'out' / CACHE_DIR} (limit 16 GB; removed at the end)"]
    assert set(prepared.values()) == {1} and len(prepared) == N_IMAGES
    assert not (tmp_path / "out" / CACHE_DIR).exists()


def test_partners_inside_their_own_chunk_need_no_cache(tree, tmp_path, monkeypatch):
    """One chunk: each source is decoded once anyway, so nothing is written to disk."""
    _, notes, prepared = run(tree, tmp_path / "out", "--variant", "original,mixed_same", "--shard-size", "100",
                             monkeypatch=monkeypatch)
    assert notes == [] and set(prepared.values()) == {1}


def test_a_cache_over_the_limit_falls_back_with_a_note(tree, tmp_path, monkeypatch):
    reference, _, _ = run(tree, tmp_path / "ref", "--variant", "original,mixed_rand")
    manifests, notes, prepared = run(tree, tmp_path / "out", "--variant", "original,mixed_rand",
                                     "--partner-cache-limit", "0.00001", monkeypatch=monkeypatch)
    assert len(notes) == 1 and notes[0].startswith(f"partner cache off: {N_IMAGES} sources need "), notes
    assert "> --partner-cache-limit 1e-05 GB" in notes[0]
    assert sum(prepared.values()) > N_IMAGES  # today's way: partners decoded again
    assert manifests == reference and tar_hashes(tmp_path / "out") == tar_hashes(tmp_path / "ref")


def test_a_disk_without_room_for_the_cache_falls_back_with_a_note(tree, tmp_path, monkeypatch):
    reference, _, _ = run(tree, tmp_path / "ref", "--variant", "mixed_next")
    real = partner_cache.shutil.disk_usage
    monkeypatch.setattr(partner_cache.shutil, "disk_usage",
                        lambda path: real(path)._replace(free=1000))
    manifests, notes, _ = run(tree, tmp_path / "out", "--variant", "mixed_next")
    assert len(notes) == 1 and "partner cache off" in notes[0] and "the disk has 0.0 MB free" in notes[0], notes
    assert manifests == reference and tar_hashes(tmp_path / "out") == tar_hashes(tmp_path / "ref")


def test_the_limit_is_a_runtime_option(tmp_path):
    config, _ = parse_args(["--out", str(tmp_path), "--partner-cache-limit", "2.5"])
    default, _ = parse_args(["--out", str(tmp_path)])
    assert config.partner_cache_limit == 2.5 and default.partner_cache_limit == 16
    assert config.output_config() == default.output_config()  # where pixels are kept never changes their bytes
    for bad in ("-1", "nan"):
        proc = subprocess.run([sys.executable, "-m", "builders.make_shards", "--out", str(tmp_path / "x"),
                               "--partner-cache-limit", bad], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "--partner-cache-limit" in lines[0], lines


# --------------------------------------------------------------------------- the files


def sample(size: int, seed: int) -> PreparedSample:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    box = np.zeros((size, size), bool)
    box[3 : size - 5, 2 : size - 1] = True
    fg = rng.random((size, size)) < 0.4
    record = SourceRecord(f"k{seed}", "x.JPEG", 1, "n01443537")
    return PreparedSample(record, image, fg, box, [2.0, 3.0, size - 1.0, size - 5.0],
                          Frame((57, 43), (53, 40), (9, 2), size, 40), "segm", ["box_too_large"] if seed else [])


@pytest.mark.parametrize("size", [36, 37])
def test_a_row_gives_back_exactly_what_was_prepared(size, tmp_path):
    from builders.config import BuildConfig

    config = BuildConfig(size=size, resize=40, mask="segm")
    layout = RowLayout(size)
    for seed in range(3):
        original = sample(size, seed)
        back = layout.unpack(layout.pack(original), original.record, config, original.selection_failures)
        for name in ("image", "fg_mask", "box_mask"):
            got, want = getattr(back, name), getattr(original, name)
            assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want), name
        assert (back.bbox, back.frame, back.mask_source) == (original.bbox, original.frame, original.mask_source)
        assert back.fg_mask.mean() == original.fg_mask.mean()  # fg_area goes into every sample's JSON


def test_only_a_complete_file_with_its_chunks_hash_is_trusted(tmp_path):
    from builders.config import BuildConfig

    config = BuildConfig(size=36, resize=40, mask="segm")
    folder = tmp_path / CACHE_DIR
    writer = ChunkCacheWriter(folder, 3, 3, 36, "abc")
    writer.add(0, sample(36, 0))
    writer.reject("k1", RejectedInput("truncated_image", "image data ends early"))
    writer.add(2, sample(36, 2))
    writer.close()
    assert read_marker(folder, 3, "abc", 3, 36) is not None
    assert read_marker(folder, 3, "other", 3, 36) is None  # another plan: redone
    assert read_marker(folder, 3, "abc", 4, 36) is None
    assert read_marker(folder, 3, "abc", 3, 32) is None

    loader = partner_cache.CacheLoader(tmp_path, config, {"k0": (3, 0), "k1": (3, 1), "k2": (3, 2)}, {3: ("abc", 3)})
    assert np.array_equal(loader.load(sample(36, 2).record).image, sample(36, 2).image)
    assert loader.load(sample(36, 2).record).selection_failures == ["box_too_large"]
    with pytest.raises(RejectedInput) as exc:  # the same error as when it was prepared
        loader.load(SourceRecord("k1", "x.JPEG", 1, "n01443537"))
    assert str(exc.value) == "truncated_image: image data ends early"
    loader.close()

    data = partner_cache.data_path(folder, 3)
    with open(data, "r+b") as fh:  # a file cut short is never read as whole
        fh.truncate(data.stat().st_size - 1)
    assert read_marker(folder, 3, "abc", 3, 36) is None
    # rewriting a chunk first withdraws its marker: a kill from here on leaves nothing vouched for
    ChunkCacheWriter(folder, 3, 3, 36, "abc").abort()
    assert not partner_cache.marker_path(folder, 3).exists()
    assert not list(folder.glob(".*.tmp"))
