"""The shard verifier: a fresh build passes; a flipped byte, a missing shard or a hostile manifest do not."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from bench.imagenet_tree import make_val_tree
from builders.make_shards import build, parse_args
from builders.shards import file_sha256
from builders.verify import VerifyError, main, verify
from pipeline.shard_format.transport import TransferPolicy

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("original", "mixed_rand")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A small two-variant build with masks: 10 images, 4 per shard -> 3 shards per variant."""
    root = tmp_path_factory.mktemp("verify-src")
    images, boxes = make_val_tree(root, 10, classes=("n01440764", "n02099601", "n02123045"),
                                  size_choices=((128, 96), (96, 128)))
    out = root / "shards"
    config, _ = parse_args(["--source", "imagenet-val", "--images", str(images), "--annotations", str(boxes),
                            "--out", str(out), "--variant", ",".join(VARIANTS), "--size", "64", "--resize", "72",
                            "--shard-size", "4", "--with-masks", "--no-progress"])
    build(config, progress=False)
    return out


@pytest.fixture
def copy(built, tmp_path) -> Path:
    """A private copy of the build that a test may damage."""
    return Path(shutil.copytree(built, tmp_path / "shards"))


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    at = len(data) // 3 if offset is None else offset
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_fresh_build_verifies(built):
    report = verify(built / "mixed_rand")
    assert report.ok and report.problems == []
    assert report.shards == 3 and report.samples == 10
    whole = verify(built)  # an output root: every variant folder
    assert whole.ok and whole.shards == 6 and len(whole.manifests) == 2
    assert verify(built / "original" / "manifest.json").ok


def test_deep_decodes_every_image(built, capsys):
    assert main([str(built), "--deep"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("OK") and "20 sample(s) decoded" in out


def test_flipped_byte_is_found_and_the_shard_named(copy, capsys):
    flip_byte(copy / "mixed_rand" / "mixed_rand-000001.tar")
    report = verify(copy)
    assert not report.ok
    assert report.problems and all("mixed_rand/mixed_rand-000001.tar" in p for p in report.problems)
    assert any("sha256" in p for p in report.problems)
    assert main([str(copy)]) == 1
    out = capsys.readouterr().out
    assert "FAIL mixed_rand/mixed_rand-000001.tar" in out and "FAILED" in out.splitlines()[-1]


def test_member_problems_are_reported(copy):
    """A sample whose .cls disagrees with its .json fails even when the manifest is rewritten to match."""
    folder = copy / "original"
    shard = folder / "original-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            if info.name.endswith(".cls"):
                data = b"999"
            if info.name.endswith(".mask.png"):
                continue
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    manifest = json.loads((folder / "manifest.json").read_text())
    entry = manifest["shards"][0]
    entry["sha256"], entry["bytes"] = file_sha256(shard), shard.stat().st_size
    manifest["totals"]["bytes"] = sum(e["bytes"] for e in manifest["shards"])
    (folder / "manifest.json").write_text(json.dumps(manifest))
    report = verify(folder)
    assert not report.ok
    assert any(".cls says 999" in p for p in report.problems)
    assert any("no .mask.png" in p for p in report.problems)
    assert not any("sha256" in p for p in report.problems)


def test_missing_shard_is_named(copy, capsys):
    (copy / "original" / "original-000002.tar").unlink()
    report = verify(copy / "original")
    assert not report.ok
    assert any("original-000002.tar" in p and "missing" in p for p in report.problems)
    assert main([str(copy / "original")]) == 1


def test_duplicate_keys_across_shards_fail(copy):
    """A shard published twice under two names holds every key twice, though each copy hashes fine."""
    folder = copy / "original"
    shutil.copy(folder / "original-000000.tar", folder / "original-000003.tar")
    manifest = json.loads((folder / "manifest.json").read_text())
    extra = {**manifest["shards"][0], "name": "original-000003.tar"}
    manifest["shards"].append(extra)
    totals = manifest["totals"]
    totals["shards"] += 1
    totals["samples"] += extra["count"]
    totals["bytes"] += extra["bytes"]
    totals["inputs"] += extra["count"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    report = verify(folder)
    assert not report.ok
    dupes = [p for p in report.problems if "already in original-000000.tar" in p]
    assert len(dupes) == extra["count"] and all(p.startswith("original/original-000003.tar") for p in dupes)


def test_totals_that_do_not_add_up_fail(copy):
    path = copy / "original" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["totals"]["inputs"] += 1
    path.write_text(json.dumps(manifest))
    report = verify(path)
    assert not report.ok and any("inputs" in p for p in report.problems)


@pytest.mark.parametrize("name", ["../x.tar", "/etc/passwd", "pipe:cat /etc/passwd", "http://elsewhere/x.tar",
                                  "sub/original-000000.tar"])
def test_manifest_names_outside_its_folder_are_refused(copy, name):
    path = copy / "original" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["shards"][0]["name"] = name
    path.write_text(json.dumps(manifest))
    report = verify(path)
    assert not report.ok
    assert [p for p in report.problems if "refusing" in p] == [
        f"original: refusing shard name {name!r}: not a plain file name next to the manifest"
    ]
    assert report.shards == 2  # the refused entry was never opened


def test_bad_arguments_exit_2_with_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for arg in (str(tmp_path / "nope"), str(tmp_path), "ftp://example.invalid/manifest.json"):
        result = subprocess.run([sys.executable, "-m", "builders.verify", arg], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, (arg, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    with pytest.raises(VerifyError):
        verify(tmp_path / "nope")


@pytest.fixture
def http_root(copy, serve):
    """The copied build over HTTP on 127.0.0.1: (base URL, folder)."""
    return serve(copy).base, copy


def test_http_manifest_verifies_and_catches_a_flipped_byte(http_root, capsys):
    base, folder = http_root
    url = f"{base}/mixed_rand/manifest.json"
    report = verify(url, deep=True)
    assert report.ok, report.problems
    assert report.shards == 3 and report.samples == 10
    assert main([url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    assert verify(f"{base}/original").ok  # a folder URL stands for its manifest

    flip_byte(folder / "mixed_rand" / "mixed_rand-000000.tar")
    report = verify(url)
    assert not report.ok and any("mixed_rand-000000.tar" in p and "sha256" in p for p in report.problems)
    (folder / "mixed_rand" / "mixed_rand-000002.tar").unlink()
    report = verify(url)
    assert any("mixed_rand-000002.tar" in p and "missing" in p for p in report.problems)


def test_unreachable_url_is_an_input_error(serve, tmp_path):
    server = serve(tmp_path)
    base = server.base
    server.shutdown()
    server.server_close()  # the port is free again: nothing listens there
    with pytest.raises(VerifyError):
        verify(f"{base}/x/manifest.json", policy=TransferPolicy(retries=1, backoff_s=0.01))


def _set(doc: dict, path: tuple[str, ...], value) -> dict:
    node = doc
    for name in path[:-1]:
        node = node[name]
    node[path[-1]] = value
    return doc


@pytest.mark.parametrize(("edit", "problem"), [
    (lambda info: _set(info, ("splits", "original_in9", "shard_lengths"), [0, 0, 0]), "original_in9.shard_lengths"),
    (lambda info: {**info, "splits": {"original": info["splits"]["original"]}}, "no split 'original_in9'"),
    (lambda info: _set(info, ("splits", "original", "filenames"), ["x.tar"]), "original.filenames"),
    (lambda info: "[" * 100_000 + "]" * 100_000, "_info.json is not JSON"),
    (lambda info: ["not", "an", "object"], "_info.json is not a JSON object"),
])
def test_timm_info_is_checked_against_the_shards(copy, edit, problem):
    path = copy / "original" / "_info.json"
    edited = edit(json.loads(path.read_text()))
    path.write_text(edited if isinstance(edited, str) else json.dumps(edited))
    report = verify(copy / "original")
    assert not report.ok and [p for p in report.problems if problem in p], report.problems
