"""The shard format on webdataset: what the builder writes, every reader reads the same way.

A built variant folder is read by timm's own WebDataset reader (through
``_info.json``), by Hugging Face ``datasets``, by plain ``webdataset`` and by
our public reader ``eval.stream.samples``, and all of them see exactly the
manifest's samples with the same labels. Our own reading stages (the member
allow-list, the bounds, strict manifests) are pinned here on hand-made tars.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import shutil
import tarfile
from pathlib import Path

import pytest

from eval import stream
from pipeline.shard_format import (
    MANIFEST_NAME,
    TIMM_INFO_NAME,
    Manifest,
    ShardSpecError,
    StreamError,
    resolve_shards,
    transport,
)
from pipeline.shard_format import spec as format_spec
from pipeline.shard_format.reader import read_shard
from pipeline.shard_format.writer import ShardFile
from tests.shard_fixtures import read_members, tar_bytes, write_variant

VARIANTS = ("original", "mixed_rand")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The embedded demo (14 real photos) in two variants, with masks."""
    from builders.make_shards import build, parse_args

    out = tmp_path_factory.mktemp("shards")
    config, _ = parse_args(["--variant", ",".join(VARIANTS), "--out", str(out), "--with-masks",
                            "--shard-size", "5", "--no-progress"])
    build(config, progress=False)
    return out


def manifest_labels(folder: Path) -> list[tuple[str, int]]:
    """(key, label) of every sample in shard order, read with tarfile only."""
    manifest = Manifest.from_bytes((folder / MANIFEST_NAME).read_bytes(), "test")
    out = []
    for entry in manifest.shards:
        members = dict(read_members(folder / entry.name))
        keys = sorted({name.partition(".")[0] for name in members})
        out += [(k, int(members[f"{k}.cls"])) for k in keys]
    assert len(out) == manifest.totals.samples > 0
    return out


def test_timm_reads_a_variant_folder_as_its_manifest_says(built):
    timm_data = pytest.importorskip("timm.data")
    folder = built / "mixed_rand"
    expected = manifest_labels(folder)
    dataset = timm_data.create_dataset("wds/bgcheck", root=str(folder), split="mixed_rand")
    got = [(image.size, target) for image, target in dataset]
    assert [t for _, t in got] == [label for _, label in expected]
    assert {size for size, _ in got} == {(224, 224)}
    # the alternative label: ImageNet-9 superclasses, samples outside the 370 classes skipped
    from pipeline.classes import to_in9

    in9 = [t for _, t in timm_data.create_dataset("wds/bgcheck", root=str(folder), split="mixed_rand_in9")]
    assert in9 == [to_in9(label) for _, label in expected if to_in9(label) >= 0]
    info = json.loads((folder / TIMM_INFO_NAME).read_text())
    assert info["splits"]["mixed_rand_in9"]["num_samples"] == len(in9)


def test_hugging_face_datasets_reads_a_variant_folder(built, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder = built / "original"
    ds = datasets.load_dataset("webdataset", data_files={"test": str(folder / "*.tar")}, split="test",
                               cache_dir=str(tmp_path / "hf"))
    got = sorted((row["__key__"], int(row["cls"])) for row in ds)
    assert got == sorted(manifest_labels(folder))
    assert all(row["jpg"].size == (224, 224) for row in ds)


def test_public_reader_yields_decoded_samples_with_provenance(built):
    expected = dict(manifest_labels(built / "mixed_rand"))
    seen = {}
    for sample in stream.samples(str(built / "mixed_rand"), masks=True):
        assert sample.image.shape == (3, 224, 224) and sample.image.dtype.is_floating_point is False
        assert sample.mask.shape == (224, 224) and sample.mask.any()
        assert sample.variant == "mixed_rand" and sample.meta["key"] == sample.key
        assert sample.bg_label == sample.meta["bg_label"] >= 0 and sample.meta["bg_key"] != sample.key
        seen[sample.key] = sample.label
    assert seen == expected


def test_public_reader_never_yields_a_shard_it_cannot_verify(built, tmp_path):
    folder = Path(shutil.copytree(built / "original", tmp_path / "original"))
    manifest = Manifest.from_bytes((folder / MANIFEST_NAME).read_bytes(), "test")
    second = folder / manifest.shards[1].name
    data = bytearray(second.read_bytes())
    data[-2000] ^= 0xFF  # in the zero padding: every sample still reads, the bytes are not the published ones
    second.write_bytes(bytes(data))
    got = []
    with pytest.raises(StreamError, match=f"{second.name}: sha256"):
        for sample in stream.samples(str(folder)):
            got.append(sample.shard)
    assert got and set(got) == {manifest.shards[0].name}  # the first shard, verified, then nothing of the second


def test_writer_output_is_deterministic_and_read_back_whole(tmp_path):
    samples = [format_spec.sample_members(f"k{i}", bytes([i]) * 700, "jpg", i, {"key": f"k{i}", "variant": "original"})
               for i in range(5)]
    digests = []
    for name in ("a.tar", "b.tar"):
        writer = ShardFile(tmp_path / name)
        for sample in samples:
            writer.write(sample)
        digests.append(writer.close())
    assert digests[0] == digests[1]
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    assert hashlib.sha256((tmp_path / "a.tar").read_bytes()).hexdigest() == digests[0][0]
    with tarfile.open(tmp_path / "a.tar") as tar:
        infos = tar.getmembers()
    assert {(i.mtime, i.mode, i.uid, i.gid, i.uname, i.gname) for i in infos} == {(0, 0o644, 0, 0, "", "")}
    assert not list(tmp_path.glob(".*.tmp"))


class Collect:
    def __init__(self) -> None:
        self.samples: list[str] = []
        self.shards: list[str] = []

    def sample(self, key, message, variant) -> None:
        self.samples.append(f"{key}: {message}")

    def shard(self, message) -> None:
        self.shards.append(message)


def test_members_outside_the_allow_list_are_never_extracted(tmp_path, monkeypatch):
    folder = write_variant(tmp_path, "original", n_samples=2, per_shard=2,
                           extra_members={"img0001.pyd": b"\x80\x04evil", "notes": b"no extension"})
    extracted = []
    real = tarfile.TarFile.extractfile
    monkeypatch.setattr(tarfile.TarFile, "extractfile", lambda self, m: extracted.append(m.name) or real(self, m))
    sink = Collect()
    (ref,) = resolve_shards(str(folder))
    from pipeline.shard_format.reader import ShardTally

    tally = ShardTally(ref.name)
    keys = [s.key for s in read_shard(ref, sink, tally=tally)]
    assert keys == ["img0000", "img0001"] and sink.samples == sink.shards == []
    assert tally.complete and tally.ignored == ["img0001.pyd", "notes"]
    assert not [n for n in extracted if n.endswith(".pyd") or n == "notes"]


def test_a_member_over_the_bound_is_refused_before_it_fills_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(transport, "MAX_MEMBER_BYTES", 4096)
    monkeypatch.setattr(transport, "_MEMBER_SLACK", 2 * tarfile.RECORDSIZE)  # tarfile reads ahead a record
    big = tar_bytes([("k.cls", b"1"), ("k.jpg", b"x" * 50_000), ("k.json", b"{}")])
    (tmp_path / "s.tar").write_bytes(big)
    sink = Collect()
    assert list(read_shard(resolve_shards(str(tmp_path / "s.tar"))[0], sink)) == []
    assert len(sink.shards) == 1 and "k.jpg is larger than 4096 bytes" in sink.shards[0], sink.shards


@pytest.mark.parametrize("compress", [
    gzip.compress,
    bz2.compress,
    lambda data: lzma.compress(data, format=lzma.FORMAT_XZ),
    lambda data: lzma.compress(data, format=lzma.FORMAT_ALONE),  # old .lzma: tarfile inflates it too
])
def test_a_compressed_tar_is_refused_before_it_is_inflated(tmp_path, compress):
    raw = tar_bytes([("k.cls", b"1"), ("k.jpg", b"\0" * (8 << 20)), ("k.json", b"{}")])
    (tmp_path / "s.tar").write_bytes(compress(raw))
    sink = Collect()
    assert list(read_shard(resolve_shards(str(tmp_path / "s.tar"))[0], sink)) == []
    assert sink.shards and "not a plain (ustar) tar" in sink.shards[0]


def test_an_empty_shard_and_trailing_data(tmp_path):
    empty = tar_bytes([])  # a chunk whose samples were all rejected for a variant
    (tmp_path / "e.tar").write_bytes(empty)
    sink = Collect()
    assert list(read_shard(resolve_shards(str(tmp_path / "e.tar"))[0], sink)) == [] and sink.shards == []
    (tmp_path / "t.tar").write_bytes(empty + b"x" * (3 << 20))
    assert list(read_shard(resolve_shards(str(tmp_path / "t.tar"))[0], sink)) == []
    assert sink.shards == ["data after the end of the archive"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["shards"][0].update(count="abc"), r"shards\[0\].count must be an integer"),
        (lambda m: m["shards"][0].update(count=True), r"shards\[0\].count must be an integer"),
        (lambda m: m["shards"][0].update(bytes=1.5), r"shards\[0\].bytes must be an integer"),
        (lambda m: m["shards"].__setitem__(0, "original-000000.tar"), r"shards\[0\] must be a JSON object"),
        (lambda m: m.update(shards={"nested": {"shards": []}}), "shards must be a list"),
        (lambda m: m.update(class_histogram={"1": "2"}), "class_histogram.1 must be an integer"),
        (lambda m: m.update(variant="../../etc/x"), "unknown variant"),
        (lambda m: m.update(variant=["original"]), "variant must be a string"),
        (lambda m: m["shards"][0].update(sha256="not-hex"), "sha256 must be a sha256"),
        (lambda m: m.update(format_version="2"), "format_version"),
    ],
)
def test_a_malformed_manifest_is_one_line_naming_its_field(tmp_path, edit, message):
    folder = write_variant(tmp_path, "original", n_samples=2, per_shard=1)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    edit(manifest)
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ShardSpecError, match=message) as info:
        resolve_shards(str(folder))
    assert "\n" not in str(info.value)


def test_a_deeply_nested_or_huge_manifest_is_refused(tmp_path, monkeypatch):
    folder = write_variant(tmp_path, "original", n_samples=1, per_shard=1)
    (folder / MANIFEST_NAME).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ShardSpecError, match="not JSON"):
        resolve_shards(str(folder))
    monkeypatch.setattr("pipeline.shard_format.locate.MAX_MANIFEST_BYTES", 1000)
    (folder / MANIFEST_NAME).write_text(json.dumps({"pad": "x" * 5000}))
    with pytest.raises(ShardSpecError, match="larger than 1000 bytes"):
        resolve_shards(str(folder))


def test_the_key_alphabet_fits_every_member_in_a_ustar_name():
    from pipeline.records import MAX_KEY_LENGTH, key_problem

    longest = max(len(e) for e in format_spec.MEMBER_EXTENSIONS)
    assert MAX_KEY_LENGTH + 1 + longest <= 100  # tarfile's USTAR name field
    key = "k" * MAX_KEY_LENGTH
    assert key_problem(key) is None and key_problem(key + "k") is not None
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo(f"{key}.{max(format_spec.MEMBER_EXTENSIONS, key=len)}")
        tar.addfile(info, io.BytesIO(b""))
    for bad in ("a,b", "a.b", "a b", "dir/a", "a\nb", "_meta", "ü"):
        assert key_problem(bad) is not None, bad
