"""Shard spec resolution and safe streaming (pipeline/shard_format readers, eval/stream.py)."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from webdataset.shardlists import split_by_node

from eval import decode, stream
from eval.stream import ReadOptions, Sample, ShardEnd, StreamError, iter_shard, make_loader
from pipeline import decode as source_decode
from pipeline.shard_format import MANIFEST_NAME, ShardSpecError, load_manifest, resolve_shards
from tests.shard_fixtures import (
    encode_image,
    make_sample,
    random_pixels,
    read_members,
    write_tar,
    write_variant,
)


def _samples(ref, **options):
    items = list(iter_shard(ref, ReadOptions(**options)))
    assert isinstance(items[-1], ShardEnd)
    return [i for i in items if isinstance(i, Sample)], items[-1]


# --------------------------------------------------------------------------- spec resolution


def test_folder_with_manifest_lists_its_shards_with_hashes(tmp_path):
    folder = write_variant(tmp_path, "original", n_samples=7, per_shard=3)
    refs = resolve_shards(str(folder))
    assert [r.name for r in refs] == ["original-000000.tar", "original-000001.tar", "original-000002.tar"]
    assert [r.count for r in refs] == [3, 3, 1]
    for ref in refs:
        assert ref.variant == "original"
        assert ref.sha256 == hashlib.sha256(Path(ref.url).read_bytes()).hexdigest()
    # the manifest path itself names the same shards
    assert resolve_shards(str(folder / MANIFEST_NAME)) == refs


def test_folder_without_manifest_globs_sorted_tars(tmp_path):
    folder = write_variant(tmp_path, "only_fg", n_samples=4, per_shard=1, manifest=False)
    refs = resolve_shards(str(folder))
    assert [r.name for r in refs] == [f"only_fg-00000{i}.tar" for i in range(4)]
    assert all(r.sha256 is None and r.count is None for r in refs)


def test_brace_pattern_and_several_specs(tmp_path):
    write_variant(tmp_path, "original", n_samples=6, per_shard=2)
    write_variant(tmp_path, "no_fg", n_samples=2, per_shard=2)
    refs = resolve_shards(str(tmp_path / "original" / "original-{000000..000001}.tar"))
    assert [r.name for r in refs] == ["original-000000.tar", "original-000001.tar"]
    both = resolve_shards(str(tmp_path / "{original,no_fg}"))
    assert [r.variant for r in both] == ["original"] * 3 + ["no_fg"]
    with pytest.raises(ShardSpecError, match="listed twice"):
        resolve_shards([str(tmp_path / "original"), str(tmp_path / "original" / MANIFEST_NAME)])


def test_missing_spec_is_an_error(tmp_path):
    with pytest.raises(ShardSpecError, match="no such shard"):
        resolve_shards(str(tmp_path / "nope.tar"))


@pytest.mark.parametrize(
    "bad_name",
    ["pipe:cat /etc/passwd", "/abs/shard.tar", "../elsewhere/shard.tar", "http://example.com/x.tar", "c:shard.tar"],
)
def test_manifest_may_not_point_outside_its_folder(tmp_path, bad_name):
    folder = write_variant(tmp_path, "original", n_samples=2, per_shard=2)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest["shards"][0]["name"] = bad_name
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ShardSpecError, match="refusing shard"):
        resolve_shards(str(folder))


def test_manifest_totals_must_match_shards(tmp_path):
    folder = write_variant(tmp_path, "original", n_samples=2, per_shard=2)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest["totals"]["samples"] = 5
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ShardSpecError, match="totals"):
        resolve_shards(str(folder))
    assert load_manifest(folder / MANIFEST_NAME).totals.samples == 5


def test_pipe_spec_streams_command_output(tmp_path):
    folder = write_variant(tmp_path, "original", n_samples=3, per_shard=3)
    direct, _ = _samples(resolve_shards(str(folder))[0])
    (ref,) = resolve_shards(f"pipe:cat {folder / 'original-000000.tar'}")
    piped, end = _samples(ref)
    assert [s.key for s in piped] == [s.key for s in direct] == ["img0000", "img0001", "img0002"]
    assert all(torch.equal(a.image, b.image) for a, b in zip(piped, direct, strict=True))
    assert end.n_read == 3


def test_failing_pipe_command_is_an_error(tmp_path):
    (ref,) = resolve_shards("pipe:exit 3")
    with pytest.raises(StreamError, match="status 3"):
        _samples(ref)


@pytest.fixture
def http_root(tmp_path, serve):
    root = tmp_path / "served"
    root.mkdir()
    return root, serve(root).base + "/"


def test_http_manifest_folder_and_plain_url(http_root):
    root, base = http_root
    write_variant(root, "mixed_rand", n_samples=4, per_shard=2)
    by_manifest = resolve_shards(base + "mixed_rand/manifest.json")
    by_folder = resolve_shards(base + "mixed_rand/")
    assert by_manifest == by_folder
    assert [r.url for r in by_manifest] == [base + "mixed_rand/mixed_rand-000000.tar", base + "mixed_rand/mixed_rand-000001.tar"]
    keys = [s.key for ref in by_manifest for s in _samples(ref)[0]]  # sha256 verified while streaming
    assert keys == ["img0000", "img0001", "img0002", "img0003"]
    (plain,) = resolve_shards(base + "mixed_rand/mixed_rand-000001.tar")
    assert plain.sha256 is None and [s.key for s in _samples(plain)[0]] == ["img0002", "img0003"]


# --------------------------------------------------------------------------- safe decoding


def test_unknown_members_are_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = pickle.dumps(Payload())
    folder = write_variant(tmp_path, "original", n_samples=2, per_shard=2, extra_members={"img0001.pyd": evil, "x.pth": evil})
    samples, end = _samples(resolve_shards(str(folder))[0])
    assert [s.key for s in samples] == ["img0000", "img0001"]
    assert end.n_read == 2 and end.skipped == {}
    assert not marker.exists()
    pickle.loads(evil).close()  # the payload is live: unpickling it would have run it
    assert marker.exists()


def test_sample_fields_and_uint8_images(tmp_path):
    folder = write_variant(tmp_path, "texture", n_samples=3, per_shard=3, size=40, fmt="png")
    samples, _ = _samples(resolve_shards(str(folder))[0])
    rng = np.random.default_rng(0)
    for s in samples:
        expected = random_pixels(rng, 40)
        assert s.image.dtype == torch.uint8 and s.image.shape == (3, 40, 40)
        assert np.array_equal(s.image.permute(1, 2, 0).numpy(), expected)  # PNG is lossless
        assert s.variant == "texture" and s.meta["label"] == s.label


def test_decompression_bomb_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(source_decode, "MAX_IMAGE_PIXELS", 30 * 30)
    folder = write_variant(tmp_path, "original", n_samples=1, per_shard=1, size=32)
    with pytest.raises(StreamError, match="img0000.*decompression_bomb"):
        _samples(resolve_shards(str(folder))[0])


def test_sha_mismatch_is_refused_unless_not_verifying(tmp_path):
    folder = write_variant(tmp_path, "original", n_samples=4, per_shard=2)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest["shards"][1]["sha256"] = "0" * 64
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    refs = resolve_shards(str(folder))
    _samples(refs[0])
    with pytest.raises(StreamError, match="original-000001.tar: sha256"):
        _samples(refs[1])
    samples, _ = _samples(refs[1], verify=False)
    assert len(samples) == 2


def test_manifest_count_mismatch_is_an_error(tmp_path):
    folder = write_variant(tmp_path, "original", n_samples=3, per_shard=3)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest["shards"][0]["count"] = 4
    manifest["totals"]["samples"] = 4
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(StreamError, match="read 3 samples, manifest says 4"):
        _samples(resolve_shards(str(folder))[0])


# --------------------------------------------------------------------------- bad shards


def _defective_shard(tmp_path, defect: str) -> Path:
    """A 3-sample shard (no manifest) with one defect around key img0001."""
    folder = write_variant(tmp_path, "original", n_samples=3, per_shard=3, manifest=False)
    path = folder / "original-000000.tar"
    members = read_members(path)
    if defect == "missing_cls":
        members = [m for m in members if m[0] != "img0001.cls"]
    elif defect == "bad_jpg":
        members = [(n, b"not a jpeg at all" if n == "img0001.jpg" else d) for n, d in members]
    elif defect == "duplicate_key":
        again = [m for m in members if m[0].startswith("img0001.")]
        members = members + again
    elif defect == "duplicate_member":
        i = next(i for i, m in enumerate(members) if m[0] == "img0001.cls")
        members.insert(i + 1, members[i])
    if defect == "truncated":
        data = path.read_bytes()
        offset = data.index(b"img0001.jpg") + 700  # inside that member's data
        path.write_bytes(data[:offset])
    elif defect == "cut_between_samples":
        data = path.read_bytes()
        offset = data.index(b"img0002.") + 100  # inside the next sample's first header
        path.write_bytes(data[:offset])
    elif defect != "cut_between_samples":
        write_tar(path, members)
    return path


def test_tar_cut_between_samples_without_manifest_is_not_a_shorter_shard(tmp_path):
    """tarfile reads a cut header as a clean end; with no manifest to compare, the missing end blocks must tell."""
    path = _defective_shard(tmp_path, "cut_between_samples")
    (ref,) = resolve_shards(str(path))
    with pytest.raises(StreamError, match="img0001.*truncated"):
        _samples(ref)


@pytest.mark.parametrize("defect", ["cut_between_samples", "truncated"])
def test_a_cut_shard_is_never_skipped(tmp_path, defect):
    """A cut transfer contributes nothing, whatever --on-error says: the shard is not complete (a rerun refetches it)."""
    (ref,) = resolve_shards(str(_defective_shard(tmp_path, defect)))
    got = []
    with pytest.raises(StreamError, match="original-000000.tar"):
        for item in iter_shard(ref, ReadOptions(on_error="skip")):
            got.append(item)
    assert not any(isinstance(item, ShardEnd) for item in got)  # never reported as complete


@pytest.mark.parametrize("defect", ["missing_cls", "bad_jpg", "duplicate_key", "duplicate_member", "truncated"])
def test_bad_shard_error_names_shard_and_key(tmp_path, defect):
    path = _defective_shard(tmp_path, defect)
    (ref,) = resolve_shards(str(path))
    with pytest.raises(StreamError) as info:
        _samples(ref)
    message = str(info.value)
    assert "original-000000.tar" in message and "img0001" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("defect", "good"),
    [
        ("missing_cls", ["img0000", "img0002"]),
        ("bad_jpg", ["img0000", "img0002"]),
        ("duplicate_key", ["img0000", "img0001", "img0002"]),
    ],
)
def test_bad_samples_skipped_and_counted(tmp_path, defect, good):
    path = _defective_shard(tmp_path, defect)
    (ref,) = resolve_shards(str(path))
    samples, end = _samples(ref, on_error="skip")
    assert [s.key for s in samples] == good
    assert end.skipped == {"original": 1}


def test_images_of_different_sizes_in_one_batch_are_an_error(tmp_path):
    rng = np.random.default_rng(1)
    members = []
    for i, size in enumerate((32, 40)):
        members += list(make_sample(f"k{i}", "original", 7, encode_image(random_pixels(rng, size))).items())
    write_tar(tmp_path / "s.tar", members)
    loader = make_loader(resolve_shards(str(tmp_path / "s.tar")), [0], 4, ReadOptions(), workers=0, pin_memory=False)
    batches = list(loader)
    assert batches[0].error and "differs" in batches[0].error and "k1" in batches[0].error


# --------------------------------------------------------------------------- splitting and batching


def test_split_by_node_assigns_every_item_once(monkeypatch):
    items = list(range(11))
    parts = []
    for rank in range(3):  # what torchrun sets for each process
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "3")
        parts.append(list(split_by_node(iter(items))))
    assert sorted(i for p in parts for i in p) == items
    assert parts[1] == [1, 4, 7, 10]


def test_loader_with_workers_reads_each_shard_once_in_whole_batches(tmp_path):
    folder = write_variant(tmp_path, "original", n_samples=10, per_shard=3)
    refs = resolve_shards(str(folder))
    loader = make_loader(refs, list(range(len(refs))), 2, ReadOptions(), workers=2, pin_memory=False)
    keys_by_shard: dict[int, list[str]] = {}
    ends = []
    for batch in loader:
        assert batch.error is None
        if batch.keys:
            assert batch.images.dtype == torch.uint8 and batch.images.shape[1:] == (3, 32, 32)
            assert len(batch.keys) <= 2
        keys_by_shard.setdefault(batch.shard_index, []).extend(batch.keys)
        if batch.end is not None:
            ends.append(batch.shard_index)
    assert sorted(ends) == [0, 1, 2, 3]
    assert keys_by_shard[1] == ["img0003", "img0004", "img0005"]
    assert sorted(k for ks in keys_by_shard.values() for k in ks) == [f"img{i:04d}" for i in range(10)]


def test_jpeg_batch_decoder_falls_back_per_image():
    rng = np.random.default_rng(2)
    good = [encode_image(random_pixels(rng, 24)) for _ in range(2)]
    bad = b"\xff\xd8 broken"
    encoded = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in (good[0], bad, good[1])]
    fallback_calls = []

    def cpu_decode(data: bytes) -> torch.Tensor:
        fallback_calls.append(data)
        return torch.zeros(3, 24, 24, dtype=torch.uint8)

    out = decode.decode_jpeg_batch(encoded, "cpu", cpu_decode=cpu_decode)
    assert fallback_calls == [bad]
    assert out[1].sum() == 0
    for image, data in zip((out[0], out[2]), good, strict=True):
        reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
        assert np.abs(image.permute(1, 2, 0).numpy().astype(int) - reference).max() <= 3  # libjpeg variants


def test_deferred_jpeg_bytes_decode_to_the_same_batch(tmp_path):
    folder = write_variant(tmp_path, "original", n_samples=4, per_shard=4)
    refs = resolve_shards(str(folder))
    (cpu_batch,) = list(make_loader(refs, [0], 8, ReadOptions(), workers=0, pin_memory=False))
    (deferred,) = list(make_loader(refs, [0], 8, ReadOptions(defer_jpeg=True), workers=0, pin_memory=False))
    assert deferred.images is None and all(t.dim() == 1 for t in deferred.items)
    images = stream.images_to_device(deferred, torch.device("cpu"))
    assert images.shape == cpu_batch.images.shape
    assert (images.int() - cpu_batch.images.int()).abs().max() <= 3


def test_deferred_jpeg_that_no_decoder_accepts_names_its_key(tmp_path):
    rng = np.random.default_rng(3)
    good = encode_image(random_pixels(rng, 32))
    broken = good[: len(good) // 2]  # header intact, data cut: passes the header check, fails decoding
    members = []
    for i, data in enumerate((good, broken)):
        members += list(make_sample(f"k{i}", "original", 7, data).items())
    write_tar(tmp_path / "s.tar", members)
    (batch,) = list(make_loader(resolve_shards(str(tmp_path / "s.tar")), [0], 4, ReadOptions(defer_jpeg=True), 0, False))
    with pytest.raises(StreamError, match=r"shard s.tar, key k1: undecodable"):
        stream.images_to_device(batch, torch.device("cpu"))
